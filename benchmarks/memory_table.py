"""Simulated peak memory of the real EasyAnimate models, per memory mode and video size (no GPU).

Every module is built from its real configuration (below) under PyTorch's FakeTensorMode: shapes,
dtypes and strides are real, no storage is allocated, nothing is computed. The pack's own code
runs on them: `sampling.encode_request_prompts` (text encoders), `sampling.predict_noise` (one
denoising step with classifier-free guidance, batch 2), `sampling.decode_latents` (Magvit VAE) and
`sampling.inpaint_condition` (VAE encode of a start image), and for training the trainer's own
`_build_lora` + `_train_step` (rollout through `rollout.rollout_video`, HPS v2.1 reward, backward,
AdamW step). Memory is counted by a small TorchDispatchMode that tallies the bytes of every storage
an operator creates while it is alive (PyTorch's MemTracker refuses modules called more than once
per iteration, and the VAE calls its blocks once per temporal chunk).

Attention: diffusers' EasyAnimate processor calls F.scaled_dot_product_attention; under fake
tensors on the CPU that dispatches to the fused flash kernel (output + a float32 logsumexp of
B x heads x tokens), as the GPU's flash / memory-efficient kernels do: no tokens x tokens matrix
is ever allocated. The script records the largest single allocation of each phase and checks it
is smaller than one tokens x tokens score matrix would be.

Placement: fake tensors cannot follow a module's device moves (they fail on fake parameters), so
every module stays on one fake device and each memory mode's placement is accounted explicitly:
VRAM of a phase = weights resident on the GPU in that mode while the phase runs + the activation
peak the counter measured for it; RAM = the weights parked on the CPU in that mode + activations
offloaded to the CPU + the decoded video (float32) on the CPU. Load-time peaks (a file read into
RAM before it moves) are not part of the table.

    python benchmarks/memory_table.py            # the full table (minutes to an hour of CPU)
    python benchmarks/memory_table.py --quick    # a few small cells (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".cache" / "pkgroot"))

GIB = 2**30
GPU_CLASSES = (16, 24, 40, 48, 80)  # GB as sold (1e9 bytes)
SIZES = ((384, 672, 25), (384, 672, 49), (576, 1008, 25), (576, 1008, 49), (768, 1344, 25), (768, 1344, 49))
QUICK_SIZES = ((256, 256, 9), (384, 672, 9))
TRAIN_SIZE = (256, 256, 49)
TEXT_TOKENS = 256

# ---- real configurations (public facts: the model folders' config files, the official README) ----
# V5.1-12b: diffusers' EasyAnimateTransformer3DModel defaults are the published V5.1 12b config
# (48 layers, 48 heads x 64, time embed 512, Qwen2-VL text width 3584); InP: 33 input channels.
_TRANSFORMER_COMMON = dict(in_channels=33, out_channels=16, patch_size=2, num_attention_heads=48,
                           attention_head_dim=64, time_embed_dim=512)
TRANSFORMERS = {
    "V5.1-12b": dict(_TRANSFORMER_COMMON, num_layers=48, mmdit_layers=48, text_embed_dim=3584,
                     text_embed_dim_t5=None, enable_text_attention_mask=True),
    # V5-12b: same blocks; Bert (1024 wide) + T5 (mT5-xl, 2048 wide) projections; the official V5
    # yaml turns the text attention mask off.
    "V5-12b": dict(_TRANSFORMER_COMMON, num_layers=48, mmdit_layers=48, text_embed_dim=1024,
                   text_embed_dim_t5=2048, enable_text_attention_mask=False),
    # V5-7b: its config is not public here; 3072 wide as the 12b, and the layer count that gives
    # its published 13.6 GB bf16 transformer file (inferred: 28 layers -> 13.6 GB).
    "V5-7b": dict(_TRANSFORMER_COMMON, num_layers=28, mmdit_layers=28, text_embed_dim=1024,
                  text_embed_dim_t5=2048, enable_text_attention_mask=False),
}
VERSIONS = {"V5.1-12b": "v5.1", "V5-12b": "v5", "V5-7b": "v5"}
# Bert of V5 (HunyuanDiT's Chinese CLIP text tower: 1.41 GB fp32 file = 352 M parameters).
BERT = dict(vocab_size=47020, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, max_position_embeddings=512)
# T5 of V5 (mT5-xl encoder: 6.68 GB fp32 file = 1.67 B parameters).
T5 = dict(vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
          feed_forward_proj="gated-gelu", is_encoder_decoder=False)
# Qwen2-VL-7B-Instruct (V5.1's text encoder, loaded whole: vision tower and lm_head included).
QWEN2VL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                    rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN2VL_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, in_channels=3,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# Magvit VAE: diffusers' AutoencoderKLMagvit defaults are the published config (128-256-512-512,
# 2 layers per block, 16 latent channels, spatial group norm).
MAGVIT: dict = {}
# VAE tiling for the "tiled" rows until easyanimate/vae.py chooses tiles by budget: diffusers'
# enable_tiling with 384 px tiles (its 512 px default never engages at 384 px).

# The official V5.1-12B table (README of aigc-apps/EasyAnimate): the smallest GPU class of each
# size and the mode it needs there.
OFFICIAL_V51_12B = {
    (384, 672, 25): (16, "model_cpu_offload_and_qfloat8"),
    (384, 672, 49): (16, "sequential_cpu_offload"),
    (576, 1008, 25): (16, "sequential_cpu_offload"),
    (576, 1008, 49): (16, "sequential_cpu_offload"),
    (768, 1344, 25): (24, "model_cpu_offload_and_qfloat8"),
    (768, 1344, 49): (40, "model_cpu_offload"),
}


# ---- counting --------------------------------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Bytes of the storages operators create while the mode is on, as long as they live.

    A storage an operator returns that none of its inputs holds is new; views and in-place results
    share an input's storage and count nothing. Storages tagged `host` (activation offload) count
    towards `host_now` instead of the device tally."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = self.host_now = self.host_peak = 0
        self.largest = 0
        self.allocations = 0
        self._live: dict[int, tuple[int, bool]] = {}
        self.host_next = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._live:
                continue
            self._add(storage, key, self.host_next)
        return out

    def _add(self, storage, key, host: bool) -> None:
        nbytes = storage.nbytes()
        self._live[key] = (nbytes, host)
        self.allocations += 1
        if host:
            self.host_now += nbytes
            self.host_peak = max(self.host_peak, self.host_now)
        else:
            self.now += nbytes
            self.peak = max(self.peak, self.now)
            self.largest = max(self.largest, nbytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        nbytes, host = self._live.pop(key, (0, False))
        if host:
            self.host_now -= nbytes
        else:
            self.now -= nbytes


class SimulatedSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
    """Stands in for torch.autograd.graph.save_on_cpu while simulating: every tensor saved for
    backward is copied to a storage tagged as host memory (the device tensor is then freed unless
    something else holds it, as with the real one), and copied back to the device in backward."""

    counter: LiveBytes | None = None

    def __init__(self, pin_memory: bool = False, device_type: str = "cuda"):
        counter = SimulatedSaveOnCpu.counter

        def pack(tensor):
            if counter is None or tensor.numel() == 0:
                return tensor
            counter.host_next = True
            try:
                return tensor.clone()
            finally:
                counter.host_next = False

        def unpack(packed):
            return packed.clone() if counter is not None else packed

        super().__init__(pack, unpack)


@contextlib.contextmanager
def simulated_activation_offload(counter: LiveBytes):
    real = torch.autograd.graph.save_on_cpu
    SimulatedSaveOnCpu.counter = counter
    torch.autograd.graph.save_on_cpu = SimulatedSaveOnCpu
    try:
        yield
    finally:
        torch.autograd.graph.save_on_cpu = real
        SimulatedSaveOnCpu.counter = None


def module_bytes(module) -> int:
    if module is None:
        return 0
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def largest_leaf_bytes(module) -> int:
    """The biggest module with own weights: what sequential offload holds on the GPU at once."""
    if module is None:
        return 0
    best = 0
    for sub in module.modules():
        own = sum(p.numel() * p.element_size() for p in sub.parameters(recurse=False))
        own += sum(b.numel() * b.element_size() for b in sub.buffers(recurse=False))
        best = max(best, own)
    return best


# ---- building the real architectures under fake tensors -------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def build_transformer(name: str, num_layers: int | None = None):
    from diffusers import EasyAnimateTransformer3DModel

    config = dict(TRANSFORMERS[name])
    if num_layers:
        config.update(num_layers=num_layers, mmdit_layers=num_layers)
    with default_dtype(torch.bfloat16):
        return EasyAnimateTransformer3DModel(**config).requires_grad_(False).eval()


def build_vae():
    from diffusers import AutoencoderKLMagvit

    with default_dtype(torch.bfloat16):
        return AutoencoderKLMagvit(**MAGVIT).requires_grad_(False).eval()


def build_text_encoders(version: str):
    from transformers import BertConfig, BertModel, Qwen2VLConfig, Qwen2VLForConditionalGeneration, T5Config, \
        T5EncoderModel

    with default_dtype(torch.bfloat16):
        if version == "v5":
            return (BertModel(BertConfig(**BERT)).requires_grad_(False).eval(),
                    T5EncoderModel(T5Config(**T5)).requires_grad_(False).eval())
        config = Qwen2VLConfig(text_config=QWEN2VL_TEXT, vision_config=QWEN2VL_VISION, **QWEN2VL_TEXT)
        return Qwen2VLForConditionalGeneration(config).requires_grad_(False).eval(), None


def tiny_tokenizers(version: str):
    """Tokenizers of the pack's tiny model folders: the encoders see 256 padded tokens either way."""
    from easyanimate_reward.easyanimate.loading import load_pipe  # noqa: F401  (same loader path)
    from easyanimate_reward.easyanimate.tiny import cached_tiny_models
    from transformers import AutoTokenizer

    folder = cached_tiny_models(REPO / ".cache" / "tiny-models")[version]
    first = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    second = AutoTokenizer.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True) if version == "v5" else None
    return first, second


def scheduler_config(version: str) -> dict:
    if version == "v5":
        return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                "beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                "prediction_type": "epsilon", "timestep_spacing": "leading"}
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def make_pipe(name: str, mode: str, parts: dict, device: str = "cpu"):
    """An EasyAnimatePipe of fake modules, prepared by the pack's own ModulePlacement for `mode`
    (qfloat8 stores the transformer's Linear weights in fp8 exactly as at run time). Compute and
    offload device are the same (fake tensors cannot move); placement is accounted in `resident`."""
    from easyanimate_reward.easyanimate.memory import ModulePlacement
    from easyanimate_reward.easyanimate.model import EasyAnimatePipe

    placement = ModulePlacement(mode, device, device)
    modules = {"transformer": parts["transformer"], "vae": parts["vae"], "text_encoder": parts["text_encoder"],
               "text_encoder_2": parts["text_encoder_2"]}
    from easyanimate_reward.easyanimate import memory

    real_move = memory._move
    memory._move = lambda module, device: None  # fake parameters cannot be swapped; same device anyway
    try:
        placement.prepare(modules)
    finally:
        memory._move = real_move
    return EasyAnimatePipe(folder=f"(simulated {name})", version=VERSIONS[name], transformer=parts["transformer"],
                           vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                           text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"],
                           scheduler_config=scheduler_config(VERSIONS[name]), dtype=torch.bfloat16,
                           placement=placement)


# ---- the phases, through the pack's own functions ---------------------------------------------------

@dataclass
class Phase:
    activations: int  # peak bytes of storages created during the phase (device)
    largest: int  # largest single allocation
    host: int = 0  # peak bytes tagged as host memory (activation offload)
    seconds: float = 0.0
    note: str = ""


def measure(fn) -> Phase:
    counter = LiveBytes()
    started = time.perf_counter()
    with counter:
        fn(counter)
    return Phase(counter.peak, counter.largest, counter.host_peak, time.perf_counter() - started)


def phase_text(pipe) -> Phase:
    from easyanimate_reward.easyanimate.sampling import encode_request_prompts

    def run(counter):
        with torch.no_grad():
            cond, uncond = encode_request_prompts(pipe, "a cat playing piano in a sunny room", "", 6.0)
            counter.kept = (cond, uncond)
    return measure(run)


def _text_conditioning(pipe, batch: int):
    from easyanimate_reward.easyanimate.text import TextConditioning

    width = pipe.transformer.config.text_embed_dim
    t5 = pipe.transformer.config.text_embed_dim_t5
    embeds = torch.zeros(batch, TEXT_TOKENS, width, dtype=pipe.dtype)
    return TextConditioning(embeds, None if t5 is None else torch.zeros(batch, TEXT_TOKENS, t5, dtype=pipe.dtype))


def phase_denoise(pipe, height: int, width: int, frames: int) -> Phase:
    """One denoising step with CFG (uncond + cond in one batch of 2), as sample_video runs it."""
    from easyanimate_reward.easyanimate.sampling import inpaint_condition, latent_shape, predict_noise

    def run(counter):
        with torch.no_grad():
            shape = latent_shape(1, width, height, frames)
            latents = torch.zeros(shape, dtype=pipe.dtype)
            inpaint = inpaint_condition(pipe, shape, frames, None, [0])
            cond, uncond = _text_conditioning(pipe, 1), _text_conditioning(pipe, 1)
            t = torch.tensor(999.0)
            out = predict_noise(pipe.transformer, latents, t, cond, inpaint, 6.0, uncond)
            latents = latents - 0.02 * out  # the scheduler's update: one more latent-sized tensor
    return measure(run)


# The pack tiles the VAE by a memory budget (easyanimate/vae.py plan_vae): the tiled rows plan for
# this budget, the untiled ones for none. ("auto" would read the device's free memory, which fake
# tensors do not have.)
TILED_VAE_BUDGET = 2 * 2**30


def set_vae_tiling(pipe, tiled: bool) -> None:
    pipe.vae_budget_bytes = TILED_VAE_BUDGET if tiled else None


def phase_decode(pipe, height: int, width: int, frames: int, tiled: bool) -> Phase:
    from easyanimate_reward.easyanimate.sampling import decode_latents, latent_shape

    set_vae_tiling(pipe, tiled)

    def run(counter):
        with torch.no_grad():
            latents = torch.zeros(latent_shape(1, width, height, frames), dtype=pipe.dtype)
            video = decode_latents(pipe, latents)
            del latents
            counter.kept = video
    try:
        return measure(run)
    finally:
        set_vae_tiling(pipe, False)


def phase_encode(pipe, height: int, width: int, frames: int, tiled: bool) -> Phase:
    """Image-to-video: the VAE encodes the start image followed by grey frames (inpaint_condition)."""
    from easyanimate_reward.easyanimate.sampling import inpaint_condition, latent_shape

    set_vae_tiling(pipe, tiled)

    def run(counter):
        start = torch.zeros(1, 3, height, width)
        counter.kept = inpaint_condition(pipe, latent_shape(1, width, height, frames), frames, start, [0])
    try:
        return measure(run)
    finally:
        set_vae_tiling(pipe, False)


# ---- placement per memory mode -------------------------------------------------------------------

@dataclass
class Weights:
    transformer: int
    transformer_fp8: int
    vae: int
    text: int  # all text encoders together
    text_largest: int  # the biggest single text encoder
    leaf: dict = field(default_factory=dict)  # largest leaf per component (sequential offload)
    blocks: int = 0
    block_bytes: int = 0

    @property
    def total(self) -> int:
        return self.transformer + self.vae + self.text


def block_swap_resident(w: Weights, resident_blocks: int = 0, prefetch: int = 2) -> int:
    """Block swap: the transformer's non-block weights + N resident blocks + the blocks in flight."""
    outside = w.transformer - w.blocks * w.block_bytes
    return outside + min(w.blocks, resident_blocks + prefetch) * w.block_bytes


def resident(mode: str, phase: str, w: Weights, qfloat8: bool = False) -> tuple[int, int, str]:
    """(weights on the GPU, weights on the CPU, how) while `phase` runs under `mode`."""
    transformer = w.transformer_fp8 if "qfloat8" in mode else w.transformer
    component = {"text": w.text, "denoise": transformer, "decode": w.vae, "encode": w.vae}[phase]
    total = transformer + w.vae + w.text
    if mode == "none":
        return total, 0, "all weights resident"
    if mode in ("model_cpu_offload", "model_cpu_offload_and_qfloat8"):
        return component, total - component, "the phase's module moved in whole"
    if mode == "sequential_cpu_offload":
        key = {"text": "text", "denoise": "transformer", "decode": "vae", "encode": "vae"}[phase]
        return w.leaf[key], total - w.leaf[key], "one leaf module's weights at a time"
    if mode.startswith("block_swap"):
        if phase == "denoise":
            kept = int(mode.rsplit("_", 1)[1]) if mode.rsplit("_", 1)[1].isdigit() else 0  # block_swap_N
            on_gpu = block_swap_resident(w, kept)
            return on_gpu, total - on_gpu, f"non-block weights + {kept} resident blocks + 2 in flight"
        return component, total - component, "the phase's module moved in whole"
    raise KeyError(mode)


# ---- the table -------------------------------------------------------------------------------------

def fits_class(nbytes: float) -> str:
    for gb in GPU_CLASSES:
        # a GPU's usable memory: its size less ~0.6 GB for the CUDA context and allocator slack
        if nbytes <= gb * 1e9 - 0.6e9:
            return f"{gb}"
    return ">80"


def memory_modes() -> tuple[str, ...]:
    from easyanimate_reward.easyanimate.memory import MEMORY_MODES

    return tuple(MEMORY_MODES)


def component_weights(parts: dict, transformer_fp8_bytes: int) -> Weights:
    t = parts["transformer"]
    blocks = list(getattr(t, "transformer_blocks", []))
    text_modules = [m for m in (parts["text_encoder"], parts["text_encoder_2"]) if m is not None]
    return Weights(
        transformer=module_bytes(t), transformer_fp8=transformer_fp8_bytes, vae=module_bytes(parts["vae"]),
        text=sum(module_bytes(m) for m in text_modules), text_largest=max(module_bytes(m) for m in text_modules),
        leaf={"text": max(largest_leaf_bytes(m) for m in text_modules), "transformer": largest_leaf_bytes(t),
              "vae": largest_leaf_bytes(parts["vae"])},
        blocks=len(blocks), block_bytes=module_bytes(blocks[0]) if blocks else 0)


def attention_check(phase: Phase, height: int, width: int, frames: int, heads: int = 48) -> str:
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16) + TEXT_TOKENS
    scores = 2 * heads * tokens * tokens * 2  # batch 2, bf16: what a non-fused attention would allocate
    ok = phase.largest < scores
    return f"largest allocation {phase.largest / GIB:.2f} GiB vs {scores / GIB:.1f} GiB for one score matrix: " \
           f"{'fused (no tokens x tokens matrix)' if ok else 'NOT FUSED'}"


def simulate_model(name: str, sizes, tokenizer_cache: dict, log=print, denoise_layers: int | None = None) -> dict:
    """denoise_layers: run the denoising step on a shallower copy (same widths). Without a graph each
    block's working set is freed before the next block runs, so the step's activation peak does not
    depend on the depth (the full-depth V5.1-12b figures agree to 1%); weights always come from the
    full-depth build."""
    version = VERSIONS[name]
    started = time.perf_counter()
    with fake_mode():
        parts = {"transformer": build_transformer(name, denoise_layers), "vae": build_vae()}
        parts["text_encoder"], parts["text_encoder_2"] = build_text_encoders(version)
    if version not in tokenizer_cache:
        tokenizer_cache[version] = tiny_tokenizers(version)
    parts["tokenizer"], parts["tokenizer_2"] = tokenizer_cache[version]
    log(f"[{name}] built in {time.perf_counter() - started:.1f} s: transformer "
        f"{module_bytes(parts['transformer']) / GIB:.2f} GiB, VAE {module_bytes(parts['vae']) / GIB:.2f} GiB, "
        f"text {sum(module_bytes(parts[k]) for k in ('text_encoder', 'text_encoder_2')) / GIB:.2f} GiB (bf16)")
    result = {"name": name, "phases": {}, "notes": []}
    if denoise_layers:
        result["notes"].append(f"denoise step simulated with {denoise_layers} of "
                               f"{TRANSFORMERS[name]['num_layers']} blocks (same widths; the no-grad peak does not "
                               "depend on the depth); weights from the full-depth model")
    with fake_mode():
        pipe = make_pipe(name, "none", parts)
        try:
            result["phases"]["text"] = phase_text(pipe)
        except Exception as e:  # noqa: BLE001 - reported in the table's notes
            result["phases"]["text"] = Phase(0, 0, note=f"text encode not simulated: {type(e).__name__}: {e}")
            result["notes"].append(result["phases"]["text"].note)
        log(f"[{name}] text encode: {result['phases']['text'].activations / GIB:.2f} GiB activations")
        for (h, w, f) in sizes:
            p = phase_denoise(pipe, h, w, f)
            result["phases"][("denoise", h, w, f)] = p
            log(f"[{name}] denoise {h}x{w}x{f}: {p.activations / GIB:.2f} GiB ({p.seconds:.0f} s); "
                + attention_check(p, h, w, f))
        # qfloat8: the pack's own quantisation of the transformer (ModulePlacement.prepare)
        from easyanimate_reward.easyanimate.memory import quantize_linears_to_float8

        quantize_linears_to_float8(parts["transformer"])
        h, w, f = sizes[-1]
        p8 = phase_denoise(pipe, h, w, f)
        result["phases"][("denoise_fp8", h, w, f)] = p8
        log(f"[{name}] denoise qfloat8 {h}x{w}x{f}: {p8.activations / GIB:.2f} GiB")
    # weights of the full-depth model: bf16, then after the pack's qfloat8 quantisation
    with fake_mode():
        full = build_transformer(name)
        weights = component_weights(dict(parts, transformer=full), 0)
        quantize_linears_to_float8(full)
        weights.transformer_fp8 = module_bytes(full)
    result["weights"] = weights
    return result


def simulate_vae(sizes, log=print) -> dict:
    """Decode/encode activations (the same Magvit VAE in every model); untiled and tiled."""
    phases = {}
    with fake_mode():
        vae = build_vae()
        parts = {"transformer": torch.nn.Linear(1, 1), "vae": vae, "text_encoder": None, "text_encoder_2": None,
                 "tokenizer": None, "tokenizer_2": None}
        pipe = make_pipe("V5.1-12b", "none", parts)
        for (h, w, f) in sizes:
            for tiled in (False, True):
                d = phase_decode(pipe, h, w, f, tiled)
                phases[("decode", tiled, h, w, f)] = d
                log(f"[VAE] decode {h}x{w}x{f} {'tiled' if tiled else 'untiled'}: {d.activations / GIB:.2f} GiB "
                    f"({d.seconds:.0f} s)")
    return phases


def cell(mode: str, weights: Weights, phases: dict, vae_phases: dict, size, tiled: bool) -> dict:
    h, w, f = size
    worst = None
    video_bytes = 3 * f * h * w * 4  # the decoded float32 frames handed to ComfyUI (CPU)
    for phase in ("text", "denoise", "decode"):
        if phase == "text":
            act = phases["text"].activations
        elif phase == "denoise":
            key = ("denoise_fp8", h, w, f) if "qfloat8" in mode and ("denoise_fp8", h, w, f) in phases else \
                ("denoise", h, w, f)
            act = phases[key].activations
        else:
            act = vae_phases[("decode", tiled, h, w, f)].activations
        gpu, cpu, _ = resident(mode, phase, weights)
        vram = gpu + act
        ram = cpu + (video_bytes if phase == "decode" else 0)
        if worst is None or vram > worst["vram"]:
            worst = {"phase": phase, "vram": vram, "ram": ram}
        worst["ram_peak"] = max(worst.get("ram_peak", 0), ram)
    return worst


def model_table(result: dict, vae_phases: dict, sizes, modes) -> list[str]:
    weights = result["weights"]
    lines = [f"### {result['name']} (simulated; weights bf16: transformer {weights.transformer / GIB:.1f} GiB, "
             f"fp8 {weights.transformer_fp8 / GIB:.1f} GiB, VAE {weights.vae / GIB:.2f} GiB, text encoders "
             f"{weights.text / GIB:.1f} GiB)", ""]
    header = "| mode | " + " | ".join(f"{h}x{w}x{f}" for h, w, f in sizes) + " |"
    lines += [header, "|---" * (len(sizes) + 1) + "|"]
    result["cells"] = {}
    for mode in modes:
        for tiled in (False, True):
            cells = []
            for size in sizes:
                try:
                    c = cell(mode, weights, result["phases"], vae_phases, size, tiled)
                except KeyError:
                    cells.append("n/a")
                    continue
                result["cells"][(mode, tiled, size)] = c
                cells.append(f"{c['vram'] / GIB:.1f} / {c['ram_peak'] / GIB:.0f} ({fits_class(c['vram'])}, "
                             f"{c['phase'][:3]})")
            label = f"{mode}{' + tiled VAE' if tiled else ''}"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "cells: peak VRAM GiB / peak RAM GiB (smallest GPU class in GB it fits, worst phase: tex(t encode), "
              "den(oise step with CFG), dec(ode))"]
    return lines


# ---- training -----------------------------------------------------------------------------------

TRAIN_VARIANTS = (
    # label, backprop, K, checkpointing, activation offload, 8-bit AdamW
    ("last, checkpointing", "last", 1, True, False, False),
    ("last, no checkpointing", "last", 1, False, False, False),
    ("tail 10, checkpointing", "tail", 10, True, False, False),
    ("tail 10, no checkpointing", "tail", 10, False, False, False),
    ("tail 10, checkpointing, activation offload", "tail", 10, True, True, False),
    ("tail 10, checkpointing, activation offload + 8-bit AdamW", "tail", 10, True, True, True),
    ("last, checkpointing, activation offload + 8-bit AdamW", "last", 1, True, True, True),
)
QUICK_TRAIN_VARIANTS = (TRAIN_VARIANTS[0], TRAIN_VARIANTS[6])


class _Bank:
    """The trainer's PromptBank, with the text conditioning already computed (the text encoders are
    off the GPU during training in every mode but `none`; their phase is accounted separately)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def cond(self, prompts):
        return _text_conditioning(self.pipe, len(prompts))

    def uncond(self, batch):
        return _text_conditioning(self.pipe, batch)


def build_hps_reward():
    from easyanimate_reward.reward.clip_text import open_clip_tokenizer
    from easyanimate_reward.reward.hps import HPSReward, build_open_clip_model

    import open_clip.factory

    real = open_clip.factory._set_model_device_and_precision
    open_clip.factory._set_model_device_and_precision = lambda *a, **k: None  # .to() fails on fake weights
    try:
        with default_dtype(torch.bfloat16):
            model = build_open_clip_model("ViT-H-14", "cpu")
    finally:
        open_clip.factory._set_model_device_and_precision = real
    return HPSReward(model, open_clip_tokenizer(), "squash", name="hps_v2.1")


def _training_pipe(name: str, num_layers: int | None, device: str):
    """A pipe of the full-size transformer (or `num_layers` of its blocks) and VAE, no text encoders."""
    from diffusers import EasyAnimateTransformer3DModel

    config = dict(TRANSFORMERS[name])
    if num_layers:
        config.update(num_layers=num_layers, mmdit_layers=num_layers)
    with default_dtype(torch.bfloat16):
        transformer = EasyAnimateTransformer3DModel(**config).requires_grad_(False).eval()
    parts = {"transformer": transformer, "vae": build_vae(), "text_encoder": None, "text_encoder_2": None,
             "tokenizer": None, "tokenizer_2": None}
    return make_pipe(name, "model_cpu_offload", parts, device)


def _error_summary(e: Exception) -> str:
    import traceback

    where = [f for f in traceback.extract_tb(e.__traceback__) if "site-packages/torch" not in f.filename]
    return f"{type(e).__name__}: {str(e)[:200]} (at {[(Path(f.filename).name, f.lineno) for f in where[-4:]]})"


def _measured_train_step(trainer, pipe, counter: "LiveBytes", checkpointing: bool, eight_bit: bool
                         ) -> tuple[int, int]:
    """One training step of `trainer` counted by `counter` -> (LoRA bytes, bytes before the rollout)."""
    from easyanimate_reward.training.rollout import enable_gradient_checkpointing, hold_on_device

    trainer._freeze_frozen_parts()
    trainer._build_lora()
    if eight_bit:
        trainer.optimizer = SimulatedAdamW8bit(trainer.lora.parameters())
    _prime_optimizer(trainer)  # steady state: the moments exist during the rollout
    lora_bytes = sum(p.numel() * p.element_size() for p in trainer.lora.parameters())
    state_bytes = counter.now - 0
    restore = enable_gradient_checkpointing(pipe) if checkpointing else (lambda: None)
    trainer.lora.attach(pipe.transformer)
    try:
        with hold_on_device(pipe) as held, _scheduler_without_lookups():
            _train_step(trainer, held, _Bank(pipe))
    finally:
        trainer.lora.detach()
        restore()
    return lora_bytes, state_bytes


def simulate_training(name: str, variants, size=TRAIN_SIZE, num_layers: int | None = None, log=print,
                      fake: bool = True, device: str = "cpu") -> list[dict]:
    """The trainer's own step (rollout with the chosen grad steps, decode of 1 latent, HPS v2.1,
    backward, AdamW) at full size. Sampling steps = K + 1: the steps outside the gradient window
    run under no_grad and keep nothing, so memory does not depend on their number."""
    from easyanimate_reward.easyanimate.model import EasyAnimateModel
    from easyanimate_reward.training.config import TrainConfig
    from easyanimate_reward.training.trainer import RewardLoRATrainer

    rows = []
    h, w, f = size
    for label, backprop, k, checkpointing, offload, eight_bit in variants:
        started = time.perf_counter()
        counter = LiveBytes()
        with fake_mode() if fake else contextlib.nullcontext():
            pipe = _training_pipe(name, num_layers, device)
            reward = build_hps_reward()
            weights = module_bytes(pipe.transformer) + module_bytes(pipe.vae) + module_bytes(reward)
            train_config = TrainConfig(width=w, height=h, frames=f, sampling_steps=k + 1, backprop=backprop,
                                       backprop_k=k, gradient_checkpointing=checkpointing, train_steps=1,
                                       save_every=0)
            _memory_options(train_config, offload, eight_bit)  # sets the TrainConfig fields
            trainer = RewardLoRATrainer(EasyAnimateModel(pipe), reward, ["a cat playing piano"], train_config)
            error, lora_bytes, state_bytes = None, 0, 0
            with counter, (simulated_activation_offload(counter) if offload else contextlib.nullcontext()):
                try:
                    lora_bytes, state_bytes = _measured_train_step(trainer, pipe, counter, checkpointing, eight_bit)
                except Exception as e:  # noqa: BLE001 - reported in the output
                    error = _error_summary(e)
        row = {"label": label, "weights": weights, "lora": lora_bytes if error is None else 0,
               "state": state_bytes if error is None else 0, "activations": counter.peak,
               "host": counter.host_peak, "seconds": time.perf_counter() - started, "error": error}
        row["vram"] = weights + counter.peak
        rows.append(row)
        log(f"[{name} training] {label}: "
            + (f"FAILED {error}" if error else
               f"peak {row['vram'] / GIB:.1f} GiB (weights {weights / GIB:.1f} + LoRA/grads/AdamW/activations "
               f"{counter.peak / GIB:.1f}; LoRA {row['lora'] / GIB:.2f}, optimizer state {row['state'] / GIB:.2f}); "
               f"offloaded to RAM {counter.host_peak / GIB:.1f} GiB ({row['seconds']:.0f} s)"))
    return rows


@contextlib.contextmanager
def _scheduler_without_lookups():
    """Flow-matching schedulers find their step index with nonzero().item(), which fake tensors
    cannot answer: start them at index 0 (the rollout runs its timesteps in order anyway)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from easyanimate_reward.training import rollout

    real_make, real_set = rollout.make_scheduler, rollout.set_timesteps

    def make(*args, **kwargs):
        with unset_fake_temporarily():  # the schedulers read their own tables with .item()
            scheduler = real_make(*args, **kwargs)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler

    def set_timesteps(scheduler, steps, device):
        with unset_fake_temporarily():
            timesteps = real_set(scheduler, steps, device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return timesteps

    rollout.make_scheduler, rollout.set_timesteps = make, set_timesteps
    try:
        yield
    finally:
        rollout.make_scheduler, rollout.set_timesteps = real_make, real_set


def _train_step(trainer, pipe, bank) -> None:
    """The trainer's step (RewardLoRATrainer._train_step) without its .item() reads, which fake
    tensors cannot answer: rollout, reward, loss, backward, clipping, optimizer step."""
    from easyanimate_reward.training import rollout

    cfg = trainer.config
    trainer.optimizer.zero_grad(set_to_none=True)
    prompts, seeds, images = trainer._micro_batch(0, 0)
    with _activation_offload(cfg):
        video = rollout.rollout_video(pipe, trainer.settings, bank.cond(prompts), bank.uncond(len(prompts)), seeds,
                                      trainer.grad_steps_for(0, 0), cfg.drtune, start_images=images)
        scores = rollout.video_rewards(trainer.reward, video, prompts, cfg.num_sampled_frames)
        loss = rollout.reward_loss(scores, cfg.max_reward, cfg.loss_scale)
    loss.backward()
    del video, scores, loss
    params = [p for p in trainer.lora.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    trainer.optimizer.step()


def _activation_offload(cfg):
    from easyanimate_reward.training.memory_options import activation_offload

    # the target device is a GPU; save_on_cpu itself is replaced by SimulatedSaveOnCpu here
    return activation_offload(cfg, "cuda")


def _memory_options(config, offload: bool, eight_bit: bool) -> dict:
    """The trainer's memory options as TrainConfig fields. bitsandbytes cannot run on fake tensors:
    with 8-bit AdamW the trainer builds plain AdamW here and SimulatedAdamW8bit replaces it."""
    config.activation_offload = offload
    config.optimizer = "adamw"
    return {}


class SimulatedAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit state layout on fake tensors (it cannot run them): two uint8 moments
    per parameter, float32 absmax per 256-element block each, two 256-entry quantile maps; tensors
    under 4096 elements keep float32 moments (bitsandbytes' min_8bit_size)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-5})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p in self.state:
                    continue
                n = p.numel()
                if n < 4096:
                    self.state[p] = {"state1": torch.zeros_like(p), "state2": torch.zeros_like(p)}
                else:
                    blocks = math.ceil(n / 256)
                    self.state[p] = {"state1": torch.zeros(n, dtype=torch.uint8),
                                     "state2": torch.zeros(n, dtype=torch.uint8),
                                     "absmax1": torch.zeros(blocks), "absmax2": torch.zeros(blocks),
                                     "qmap1": torch.zeros(256), "qmap2": torch.zeros(256)}


def _prime_optimizer(trainer) -> None:
    params = list(trainer.lora.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def extrapolated_training(name: str, variants, size, layer_counts: list[int], log=print) -> list[dict]:
    """Each training row simulated at two layer counts and extrapolated linearly to the real depth:
    every block is identical, so the LoRA, its gradients and optimizer state and the activations the
    grad steps keep all grow by the same amount per block. Weights are those of the full model."""
    low, high = layer_counts
    full_layers = TRANSFORMERS[name]["num_layers"]
    with fake_mode():
        transformer = build_transformer(name)
        full_weights = module_bytes(transformer) + module_bytes(build_vae()) + module_bytes(build_hps_reward())
    rows = []
    for variant in variants:
        a = simulate_training(name, (variant,), size, num_layers=low, log=log)[0]
        b = simulate_training(name, (variant,), size, num_layers=high, log=log)[0]
        row = dict(b)
        if a["error"] or b["error"]:
            rows.append(row)
            continue
        for key in ("activations", "host", "state", "lora"):
            per_layer = (b[key] - a[key]) / (high - low)
            row[key] = int(b[key] + per_layer * (full_layers - high))
        row["weights"] = full_weights
        row["vram"] = full_weights + row["activations"]
        row["label"] = variant[0]
        row["note"] = f"extrapolated from {low} and {high} layers"
        log(f"[{name} training, extrapolated to {full_layers} layers] {variant[0]}: peak {row['vram'] / GIB:.1f} GiB, "
            f"RAM for offloaded activations {row['host'] / GIB:.1f} GiB")
        rows.append(row)
    return rows


def training_table(name: str, rows: list[dict]) -> list[str]:
    lines = [f"### {name} training step at {TRAIN_SIZE[0]}x{TRAIN_SIZE[1]}x{TRAIN_SIZE[2]} (simulated; LoRA rank 128 "
             "on every Linear, AdamW, HPS v2.1 ViT-H-14 reward, 1 decoded latent, cfg 6, model_cpu_offload: "
             "transformer + VAE + reward resident, text encoders off the GPU)", "",
             "| configuration | peak VRAM GiB | fits (GB) | of which weights | LoRA + optimizer state | RAM for offloaded activations GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | |")
            continue
        label = r["label"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {label} | {r['vram'] / GIB:.1f} | {fits_class(r['vram'])} | {r['weights'] / GIB:.1f} | "
                     f"{r['state'] / GIB:.2f} | {r['host'] / GIB:.1f} |")
    return lines


# ---- comparison with the official table and the targets ------------------------------------------

def fastest_fitting(result: dict, size, gb: int, modes) -> str | None:
    for mode in modes:  # MEMORY_MODES is ordered fastest first
        for tiled in (False, True):
            c = result["cells"].get((mode, tiled, size))
            if c is not None and c["vram"] <= gb * 1e9 - 0.6e9:
                return f"{mode}{' + tiled VAE' if tiled else ''}"
    return None


def comparison(result: dict, sizes, modes) -> list[str]:
    lines = ["### V5.1-12b against the official table (smallest GPU class per size) and the targets", "",
             "| size | official | this pack (simulated) | target: one class smaller or a faster mode |", "|---|---|---|---|"]
    speed = {m: i for i, m in enumerate(modes)}
    for size in sizes:
        if size not in OFFICIAL_V51_12B:
            continue
        gb, mode = OFFICIAL_V51_12B[size]
        ours = None
        for cls in GPU_CLASSES:
            found = fastest_fitting(result, size, cls, modes)
            if found:
                ours = (cls, found)
                break
        if ours is None:
            lines.append(f"| {'x'.join(map(str, size))} | {gb} GB {mode} | does not fit 80 GB | NO |")
            continue
        smaller = ours[0] < gb
        same_faster = ours[0] == gb and speed.get(ours[1].split(" +")[0], 99) < speed.get(mode, 99)
        verdict = "yes" if smaller or same_faster else "NO"
        lines.append(f"| {'x'.join(map(str, size))} | {gb} GB {mode} | {ours[0]} GB {ours[1]} | {verdict} |")
    return lines


def training_targets(rows: list[dict]) -> list[str]:
    by = {r["label"]: r for r in rows}
    out = []
    for label, gb in (("tail 10, checkpointing", 48), ("tail 10, checkpointing, activation offload + 8-bit AdamW", 24)):
        r = by.get(label)
        if r is None or r["error"]:
            continue
        ok = r["vram"] <= gb * 1e9 - 0.6e9
        out.append(f"- target: 12b training step, {label}, on {gb} GB: {r['vram'] / GIB:.1f} GiB -> "
                   f"{'yes' if ok else 'NO'}")
    return out


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small cells (CI)")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ", ".join(TRANSFORMERS))
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--training-only", action="store_true", help="only the training rows")
    parser.add_argument("--denoise-layers", type=int, default=None,
                        help="simulate the denoising step with this many blocks (same widths; default: full depth)")
    parser.add_argument("--variants", default=None,
                        help="training rows to run, comma-separated indices into TRAIN_VARIANTS (default: all)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--fit-layers", default=None,
                        help="training rows from two smaller layer counts (e.g. 4,8), extrapolated linearly to the "
                             "model's layer count (the blocks are identical), instead of the full-depth simulation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modes = memory_modes()
    sizes = QUICK_SIZES if args.quick else SIZES
    names = args.models.split(",") if args.models else (["V5.1-12b"] if args.quick else list(TRANSFORMERS))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = [f"# EasyAnimate memory table (simulated with fake tensors, {datetime.date.today().isoformat()})", ""]
    vae_phases = simulate_vae(sizes, log) if not args.training_only else {}
    tokenizers: dict = {}
    results = {}
    for name in ([] if args.training_only else names):
        results[name] = simulate_model(name, sizes, tokenizers, log, args.denoise_layers)
        table = model_table(results[name], vae_phases, sizes, modes) + [""]
        table += [f"note: {note}" for note in results[name]["notes"]]
        log("\n".join(table))  # as soon as a model is done (the full run takes long)
        out += table
    if "V5.1-12b" in results and not args.quick:
        out += comparison(results["V5.1-12b"], sizes, modes) + [""]
    training = {}
    if not args.no_training:
        variants = QUICK_TRAIN_VARIANTS if args.quick else TRAIN_VARIANTS
        if args.variants:
            variants = tuple(TRAIN_VARIANTS[int(i)] for i in args.variants.split(","))
        train_names = ["V5.1-12b"] if args.quick else [n for n in names if n == "V5.1-12b"]
        for name in train_names:
            size = QUICK_SIZES[0] if args.quick else TRAIN_SIZE
            if args.fit_layers:
                training[name] = extrapolated_training(name, variants, size, [int(x) for x in args.fit_layers.split(",")],
                                                       log)
            else:
                training[name] = simulate_training(name, variants, size, num_layers=2 if args.quick else None, log=log)
            table = training_table(name, training[name]) + [""] + training_targets(training[name]) + [""]
            log("\n".join(table))
            out += table
    first = next(iter(results.values())) if results else {"phases": {}}
    for phase, p in first["phases"].items():
        if isinstance(phase, tuple) and phase[0] == "denoise":
            out.append(f"attention at {phase[1]}x{phase[2]}x{phase[3]}: " + attention_check(p, *phase[1:]))
    out.append("placement accounted per mode (fake tensors cannot move): VRAM = weights resident in that mode + the "
               "phase's measured activation peak; RAM = weights parked on the CPU + decoded video + offloaded "
               "activations. GPU classes leave 0.6 GB for the CUDA context.")
    print("\n".join(out))
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(results, vae_phases, training), indent=1))
    return 0


def _jsonable(results, vae_phases, training) -> dict:
    def key(k):
        return k if isinstance(k, str) else "|".join(map(str, k))

    data = {"models": {}, "vae": {key(k): v.activations for k, v in vae_phases.items()}, "training": training}
    for name, r in results.items():
        data["models"][name] = {
            "weights": r["weights"].__dict__,
            "phases": {key(k): v.activations for k, v in r["phases"].items()},
            "cells": {key(k): v for k, v in r.get("cells", {}).items()},
        }
    return data


if __name__ == "__main__":
    sys.exit(main())
