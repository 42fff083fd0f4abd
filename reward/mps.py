"""MPS (Multi-dimensional Preference Score, Kwai-Kolors, CVPR 2024), the "overall" model.

Architecture (from the public MPS code and EasyAnimate's adaptation of it; re-implemented here):
- a transformers CLIPModel CLIP-H (LAION ViT-H-14 layout), keys `model.*` in the checkpoint;
- a 4-layer "cross model" (keys `cross_model.*`): each layer = residual cross-attention (image
  tokens attend to prompt tokens; multi-query: `heads` query heads, ONE shared key/value head of
  `dim_head`; bias-free LayerNorm on the queries only; a parallel SwiGLU feed-forward on the
  normed queries) followed by a residual "parallel" self-attention block (bias-free LayerNorm,
  one fused projection to q / k / v / feed-forward, rotary position embedding on q and k,
  multi-query attention, output = attn_out(attention) + ff_out(SwiGLU(ff))).
- Token features: image = visual_projection(vision last_hidden_state) (all 257 tokens, before
  the vision post-LayerNorm, as MPS does); prompt = text_projection(text last_hidden_state) (all 77
  tokens); condition = the same for the fixed quality phrase below.
- Condition mask: sim[b, i] = max over condition tokens j of <prompt_token_i, condition_token_j>,
  divided by its maximum; prompt tokens with sim <= 0.01 are masked out (-inf) in cross-attention.
- score = logit_scale.exp() * cosine(text_projection(text pooler_output), cross_model(...)[:, 0]).

Two deliberate choices, both documented where they matter:
- MPS divides `sim` by its maximum over the WHOLE batch; that couples the scores of unrelated
  samples when a batch mixes prompts. We divide per sample (identical when the batch shares one
  prompt, which is how MPS's own inference calls it), and always keep each sample's best token so a
  row can never be fully masked (all -inf would give NaN).
- MPS's README scores with `logit_scale.exp() * cosine` (REFERENCE.md follows it); EasyAnimate's
  trainer used the plain cosine. `use_logit_scale=False` gives the latter (a 1/100 rescale).
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip_reward import ClipReward, encode_unique
from .clip_text import ClipTokenizer, open_clip_tokenizer, tokenizer_for_folder
from .sources import MPS_CHECKPOINT_FILE, MPS_CHECKPOINT_FILES, MPS_CONVERTED_FILE, MPS_SOURCE
from .state_dict import read_state_dict

log = logging.getLogger(__name__)

MPS_OVERALL_CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
    "instance, texture, quantity, attributes, position, number, location, word, things."
)
MPS_HINT = f"get it from {MPS_SOURCE}; a pickled original converts with tools/convert_mps_checkpoint.py"
CONDITION_KEEP_THRESHOLD = 0.01  # MPS keeps prompt tokens whose normalised similarity exceeds this

# transformers CLIPConfig of LAION CLIP-ViT-H-14-laion2B-s32B-b79K (the MPS backbone), so the model
# can be built offline. Numbers from the public config.json; eos_token_id 2 is that file's legacy
# value, which makes transformers pool at the highest token id (= <|endoftext|>).
CLIP_VIT_H14_CONFIG = {
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 1024,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 1024,
    },
}

# Checkpoint keys that are not weights (buffers older code saved): tolerated whether present or not.
CLIP_NON_WEIGHT_SUFFIXES = (".position_ids",)
CROSS_NON_WEIGHT_SUFFIXES = (".inv_freq", ".norm.bias")  # rotary frequencies, the fixed zero LayerNorm bias


# ----------------------------------------------------------------------------- cross model


class BiaslessLayerNorm(nn.Module):
    """LayerNorm with a learnt gain and a fixed zero bias (kept as a buffer: it is in the checkpoint)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class SwiGLU(nn.Module):
    """Split the last dim into (value, gate): value * silu(gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.silu(gate)


class RotaryEmbedding(nn.Module):
    """Rotary angles, computed in float32 on every call from `dim_head` alone.

    No buffer on purpose: `.to(bfloat16)` would round the frequencies (a relative error of 2^-9,
    which at position 256 shifts an angle by up to ~0.5 rad). Checkpoints that carry the old
    `.inv_freq` buffer still load: the key is tolerated and ignored (it is the same formula).
    """

    def __init__(self, dim_head: int):
        super().__init__()
        self.dim_head = dim_head

    def angles(self, length: int, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.dim_head, 2, device=device, dtype=torch.float32) / self.dim_head
        inv_freq = 1.0 / (10000**exponents)
        positions = torch.arange(length, device=device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        return torch.cat([freqs, freqs], dim=-1)  # (length, dim_head): both halves share frequencies


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)


def multi_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """q (B, H, N, D) already scaled; k, v (B, M, D) shared by all heads; bias broadcastable to (B, H, N, M)."""
    logits = torch.einsum("bhnd,bmd->bhnm", q, k)
    if bias is not None:
        logits = logits + bias
    weights = logits.float().softmax(dim=-1).to(v.dtype)  # float32 softmax: safe under fp16/bf16
    return torch.einsum("bhnm,bmd->bhnd", weights, v)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class CrossAttention(nn.Module):
    """Queries (image tokens) attend to a context (prompt tokens); plus a parallel SwiGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = BiaslessLayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * ff_mult * dim, bias=False), SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)  # the context is used as is (MPS does not normalise it)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2) * self.dim_head**-0.5
        k, v = self.to_kv(context).chunk(2, dim=-1)
        out = merge_heads(multi_query_attention(q, k, v, context_bias))
        return self.to_out(out) + self.ff(x)


class ParallelSelfAttentionBlock(nn.Module):
    """One fused projection -> (q, k, v, ff); rotary q/k; output = attention path + SwiGLU path."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.split_sizes = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)
        self.norm = BiaslessLayerNorm(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.split_sizes), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)
        angles = self.rotary_emb.angles(n, x.device)
        q = apply_rotary(q, angles) * self.dim_head**-0.5
        k = apply_rotary(k, angles)
        out = merge_heads(multi_query_attention(q, k, v, None))
        return self.attn_out(out) + self.ff_out(ff)


class Residual(nn.Module):
    """x + fn(x, ...); the wrapper exists so parameter names match the checkpoint (`.fn.`)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return x + self.fn(x, *args)


class MPSCrossModel(nn.Module):
    """Stack of (cross-attention to the prompt, parallel self-attention) layers over image tokens."""

    def __init__(self, dim: int = 1024, layers: int = 4, heads: int = 16, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.config = {"dim": dim, "layers": layers, "heads": heads, "dim_head": dim_head, "ff_mult": ff_mult}
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(CrossAttention(dim, heads, dim_head, ff_mult)),
                    Residual(ParallelSelfAttentionBlock(dim, heads, dim_head, ff_mult)),
                ]
            )
            for _ in range(layers)
        )

    def forward(self, image_tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_bias: torch.Tensor) -> torch.Tensor:
        x = image_tokens
        for cross, self_block in self.layers:
            x = cross(x, prompt_tokens, prompt_bias)
            x = self_block(x)
        return x


def infer_cross_model_config(state_dict: dict[str, torch.Tensor], prefix: str = "cross_model.") -> dict[str, int]:
    """Read dim / layers / heads / dim_head / ff_mult off the weight shapes."""
    to_q = state_dict[f"{prefix}layers.0.0.fn.to_q.weight"]  # (heads * dim_head, dim)
    to_kv = state_dict[f"{prefix}layers.0.0.fn.to_kv.weight"]  # (2 * dim_head, dim)
    ff_in = state_dict[f"{prefix}layers.0.0.fn.ff.0.weight"]  # (2 * ff_mult * dim, dim)
    dim = to_q.shape[1]
    dim_head = to_kv.shape[0] // 2
    layer_ids = {int(k[len(prefix) :].split(".")[1]) for k in state_dict if k.startswith(f"{prefix}layers.")}
    return {
        "dim": dim,
        "layers": max(layer_ids) + 1,
        "heads": to_q.shape[0] // dim_head,
        "dim_head": dim_head,
        "ff_mult": ff_in.shape[0] // (2 * dim),
    }


# ----------------------------------------------------------------------------- reward


class MPSModel(nn.Module):
    """The two halves of an MPS checkpoint under the checkpoint's own names."""

    def __init__(self, clip_model: nn.Module, cross_model: MPSCrossModel):
        super().__init__()
        self.model = clip_model
        self.cross_model = cross_model


def condition_bias(prompt_tokens: torch.Tensor, condition_tokens: torch.Tensor) -> torch.Tensor:
    """(B, 77, P) prompt token features, (B, 77, P) condition features -> additive bias (B, 1, 1, 77)."""
    sim = torch.einsum("bip,bjp->bij", prompt_tokens.float(), condition_tokens.float()).amax(dim=-1)  # (B, 77)
    best = sim.amax(dim=-1, keepdim=True)
    keep = (sim / best > CONDITION_KEEP_THRESHOLD) | (sim == best)
    bias = torch.zeros_like(sim).masked_fill(~keep, float("-inf"))
    return bias[:, None, None, :]


class MPSReward(ClipReward):
    """MPS overall preference on (CLIPModel, cross model, tokenizer); see the module doc for the formula."""

    def __init__(
        self,
        mps: MPSModel,
        tokenizer: ClipTokenizer,
        condition: str = MPS_OVERALL_CONDITION,
        preprocess_mode: str = "crop",
        use_logit_scale: bool = True,
        name: str = "mps",
    ):
        super().__init__(preprocess_mode, mps.model.config.vision_config.image_size, name)
        self.mps = mps
        self.tokenizer = tokenizer
        self.condition = condition
        self.use_logit_scale = use_logit_scale
        # The condition phrase is fixed: its token features are computed once per weights device /
        # dtype (and inference mode, so a tensor made under ComfyUI's inference mode never leaks
        # into training). Plain attribute, not a buffer: it is derived, never saved.
        self._condition_cache: dict[tuple, torch.Tensor] = {}
        self.freeze()

    def _text_tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device, _ = self.device_dtype
        clip = self.mps.model
        out = clip.text_model(input_ids=self.tokenizer(prompts).to(device))
        return clip.text_projection(out.last_hidden_state), clip.text_projection(out.pooler_output)

    @torch.no_grad()
    def condition_tokens(self) -> torch.Tensor:
        """Token features (1, 77, P) of the condition phrase, cached."""
        device, dtype = self.device_dtype
        key = (self.condition, device, dtype, torch.is_inference_mode_enabled())
        if key not in self._condition_cache:
            self._condition_cache.clear()  # only the current placement is worth keeping
            self._condition_cache[key] = self._text_tokens([self.condition])[0]
        return self._condition_cache[key]

    @torch.no_grad()
    def text_side(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompt token features (B, 77, P), prompt EOS embedding (B, P), condition bias (B, 1, 1, 77)."""
        condition = self.condition_tokens()

        def encode(distinct: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            prompt_tokens, prompt_eos = self._text_tokens(distinct)
            bias = condition_bias(prompt_tokens, condition.expand(len(distinct), -1, -1))
            return prompt_tokens, prompt_eos, bias.to(prompt_tokens.dtype)

        return encode_unique(prompts, encode)

    def score_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        clip = self.mps.model
        prompt_tokens, prompt_eos, bias = self.text_side(prompts)
        image_tokens = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).last_hidden_state)
        judged = self.mps.cross_model(image_tokens, prompt_tokens, bias)[:, 0]
        cosine = F.cosine_similarity(judged.float(), prompt_eos.float(), dim=-1, eps=1e-12)
        return clip.logit_scale.float().exp() * cosine if self.use_logit_scale else cosine

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score_pixels(self.pixel_values(frames), prompts)


# ----------------------------------------------------------------------------- loading


def build_clip_model(clip_config: dict | None = None) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    cfg = dict(clip_config or CLIP_VIT_H14_CONFIG)
    return CLIPModel(CLIPConfig(**cfg))


def read_mps_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = read_state_dict(path)
    except pickle.UnpicklingError as err:  # a pickled whole module is refused by weights_only
        raise ValueError(
            f"{path} is not a plain state dict (weights_only loading failed: {err}). If it is the original "
            f"pickled MPS checkpoint, convert it once with tools/convert_mps_checkpoint.py"
        ) from err
    if not any(k.startswith("cross_model.") for k in state) or not any(k.startswith("model.") for k in state):
        raise ValueError(f"{path}: no model.* / cross_model.* keys: not an MPS checkpoint")
    return state


def load_tolerant(
    module: nn.Module, state_dict: dict[str, torch.Tensor], path: str, tolerated: tuple[str, ...], assign: bool = False
) -> None:
    """Strict, except that keys ending in `tolerated` (non-weight buffers) may be missing or extra."""
    result = module.load_state_dict(state_dict, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if not k.endswith(tolerated)]
    unexpected = [k for k in result.unexpected_keys if not k.endswith(tolerated)]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the MPS architecture: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def build_clip_with_weights(clip_config: dict | None, state_dict: dict[str, torch.Tensor], path: str) -> nn.Module:
    """CLIPModel built on the meta device, adopting the checkpoint tensors.

    A random CLIP-H init costs ~13 s of CPU and a second copy of 1 B weights, all overwritten.
    transformers' non-persistent `position_ids` buffers (not in checkpoints) are rebuilt; anything
    else left on meta falls back to a regular init.
    """
    with torch.device("meta"):
        clip = build_clip_model(clip_config)
    load_tolerant(clip, state_dict, path, CLIP_NON_WEIGHT_SUFFIXES, assign=True)
    for name, buffer in list(clip.named_buffers()):
        if not buffer.is_meta:
            continue
        owner, _, leaf = name.rpartition(".")
        if leaf != "position_ids":
            log.info("CLIP buffer %s is not in the checkpoint: using a regular init", name)
            clip = build_clip_model(clip_config)
            load_tolerant(clip, state_dict, path, CLIP_NON_WEIGHT_SUFFIXES)
            return clip
        positions = torch.arange(buffer.shape[-1]).expand(buffer.shape)
        clip.get_submodule(owner).register_buffer(leaf, positions, persistent=False)
    return clip


def resolve_mps_checkpoint(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in MPS_CHECKPOINT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(
            f"MPS checkpoint not found: expected {os.path.join(path, MPS_CHECKPOINT_FILE)} "
            f"(or {MPS_CONVERTED_FILE}; {MPS_HINT})"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MPS checkpoint not found: {path} ({MPS_HINT})")
    return path


def load_mps(
    checkpoint_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_config: dict | None = None,
    tokenizer_folder: str | os.PathLike | None = None,
    condition: str = MPS_OVERALL_CONDITION,
    preprocess_mode: str = "crop",
    use_logit_scale: bool = True,
) -> MPSReward:
    """MPS overall from a local state dict (.pth via weights_only, or .safetensors).

    `clip_config`: transformers CLIPConfig kwargs; default the CLIP-H numbers shipped above (no
    download). The cross model's sizes are read off the checkpoint. `tokenizer_folder`: optional
    folder with CLIP tokenizer files; default the open_clip-bundled BPE (pads with id 0 like the
    LAION CLIP-H tokenizer MPS used).
    """
    path = resolve_mps_checkpoint(checkpoint_path)
    state_dict = read_mps_state_dict(path)
    clip_state = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    cross_state = {k[len("cross_model."):]: v for k, v in state_dict.items() if k.startswith("cross_model.")}
    others = sorted(k for k in state_dict if not k.startswith(("model.", "cross_model.")))
    if others:
        raise ValueError(f"{path} does not match the MPS architecture: unexpected {others[:8]}")
    clip = build_clip_with_weights(clip_config, clip_state, path)
    with torch.device(device):  # the 118 M-parameter cross model is cheap to initialise for real
        cross = MPSCrossModel(**infer_cross_model_config(cross_state, prefix=""))
    load_tolerant(cross, cross_state, path, CROSS_NON_WEIGHT_SUFFIXES)
    mps = MPSModel(clip, cross).to(device=device, dtype=dtype)
    tokenizer = tokenizer_for_folder(tokenizer_folder) if tokenizer_folder else open_clip_tokenizer()
    log.info("loaded MPS from %s (%s, %s), cross model %s", path, device, dtype, mps.cross_model.config)
    return MPSReward(mps, tokenizer, condition, preprocess_mode, use_logit_scale)
