"""LAION aesthetic predictors as differentiable rewards: Aesthetic v2 (CLIP ViT-L/14) and v2.5 (SigLIP).

Both are "frozen image embedding -> L2 normalise -> small linear stack -> one number (about 1..10)".
The stacks have dropout between some layers in training and no activations; at eval dropout is
the identity, so the score is an affine function of the normalised embedding. We rebuild each
stack as an `nn.Sequential` with `nn.Identity` where the original had dropout, so the public
state-dict keys load strictly and unchanged:

- v2, `sac+logos+ava1-l14-linearMSE.pth` (christophschuhmann/improved-aesthetic-predictor):
  float32, keys `layers.{0,2,4,6,7}.{weight,bias}`, widths 768-1024-128-64-16-1
  (no dropout between the 64->16 and 16->1 layers, hence indices 6 and 7).
  Backbone: CLIP ViT-L/14 image embedding (`visual_projection(post_layernorm(CLS))`, 768 wide),
  i.e. OpenAI `encode_image`. Input: shortest side 224 + centre crop, OpenAI CLIP mean/std.
- v2.5, `aesthetic_predictor_v2_5.pth` (discus0434/aesthetic-predictor-v2-5): bfloat16,
  keys `scoring_head.{0,2,4,6,8}.{weight,bias}`, widths 1152-1024-128-64-16-1.
  Backbone: SigLIP so400m-patch14-384 vision tower, `pooler_output` (attention-pool head,
  1152 wide). Input: both sides to 384 (no crop), mean = std = 0.5.

Backbones load from transformers model folders (`config.json` + weights), e.g. a download of
`openai/clip-vit-large-patch14` and `google/siglip-so400m-patch14-384`; full CLIPModel /
SiglipModel folders work (only the vision tower is built and loaded). The head widths are read
from the head file and must match the backbone's embedding width.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..easyanimate.folder_files import check_folder_files
from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, clip_preprocess
from .state_dict import read_state_dict

# Positions of the Linear layers inside each original nn.Sequential (the rest were Dropout).
V2_LINEAR_POSITIONS = (0, 2, 4, 6, 7)
V2_5_LINEAR_POSITIONS = (0, 2, 4, 6, 8)
V2_HEAD_PREFIX = "layers"
V2_5_HEAD_PREFIX = "scoring_head"


def build_linear_stack(widths: Sequence[int], linear_positions: Sequence[int]) -> nn.Sequential:
    """Linear layers widths[0] -> widths[1] -> ... at the given Sequential indices, Identity elsewhere."""
    if len(widths) != len(linear_positions) + 1:
        raise ValueError(f"{len(linear_positions)} linear layers need {len(linear_positions) + 1} widths, got {widths}")
    modules: list[nn.Module] = [nn.Identity() for _ in range(linear_positions[-1] + 1)]
    for layer, position in enumerate(linear_positions):
        modules[position] = nn.Linear(widths[layer], widths[layer + 1])
    return nn.Sequential(*modules)


def head_widths_from_state_dict(state_dict: dict, prefix: str, linear_positions: Sequence[int]) -> list[int]:
    """Read [in, hidden..., out] from the weight shapes, checking every expected key is there."""
    expected = [f"{prefix}.{p}.{part}" for p in linear_positions for part in ("weight", "bias")]
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"not an aesthetic head with keys {prefix}.{list(linear_positions)}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    shapes = [tuple(state_dict[f"{prefix}.{p}.weight"].shape) for p in linear_positions]
    widths = [shapes[0][1]] + [out for out, _ in shapes]
    for (_, fan_in), width in zip(shapes, widths[:-1]):
        if fan_in != width:
            raise ValueError(f"aesthetic head layers do not chain: shapes {shapes}")
    if widths[-1] != 1:
        raise ValueError(f"aesthetic head must end in one output, got shapes {shapes}")
    return widths


def load_head(path: str | os.PathLike, prefix: str, linear_positions: Sequence[int]) -> nn.Sequential:
    """Load a head state dict file (torch pickle of tensors only: weights_only=True) into float32."""
    state_dict = read_state_dict(path, "the aesthetic predictor's head (a small linear stack)")
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    # The container name is the Sequential itself here: strip it to load into the bare Sequential.
    widths = head_widths_from_state_dict(state_dict, prefix, linear_positions)
    head = build_linear_stack(widths, linear_positions)
    stripped = {key[len(prefix) + 1 :]: value.float() for key, value in state_dict.items()}
    head.load_state_dict(stripped, strict=True)
    return head


class AestheticReward(Reward):
    """embedding(preprocess(frames)) -> L2 normalise -> linear head -> score.

    The backbone runs in its own dtype; the normalisation and the head run in float32 (the head
    is tiny, and an L2 norm in half precision costs accuracy for nothing).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Sequential,
        image_size: int,
        resize_mode: str,
        mean: Sequence[float],
        std: Sequence[float],
        name: str,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head.float()
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.name = name
        self.freeze()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        return clip_preprocess(frames, self.image_size, self.resize_mode, self.mean, self.std)

    def normalized_embedding(self, frames: torch.Tensor) -> torch.Tensor:
        reference = next(self.backbone.parameters())
        pixels = self.pixel_values(frames.to(reference.device)).to(reference.dtype)
        embedding = self.embed(pixels).float()
        return embedding / embedding.norm(dim=-1, keepdim=True)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        head_dtype = self.head[0].weight.dtype
        return self.head(self.normalized_embedding(frames).to(head_dtype)).squeeze(-1)


class AestheticV2Reward(AestheticReward):
    """LAION improved aesthetic predictor on CLIP ViT-L/14 (`CLIPVisionModelWithProjection`)."""

    def __init__(self, vision_model: nn.Module, head: nn.Sequential, preprocess_mode: str = "crop"):
        # "crop" (default): CLIP's own processor (shortest side + centre crop). "squash": both
        # sides to 224 without keeping the aspect ratio, as EasyAnimate's reward trainer does.
        config = vision_model.config
        super().__init__(
            vision_model, head, config.image_size, preprocess_mode, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "aesthetic_v2"
        )

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # visual_projection(pooler_output) is OpenAI's encode_image; this spelling works on
        # transformers 4.x and 5.x alike (5.x returns output objects from get_image_features).
        pooled = self.backbone.vision_model(pixel_values=pixel_values).pooler_output
        return self.backbone.visual_projection(pooled)


class AestheticV25Reward(AestheticReward):
    """Aesthetic predictor v2.5 on SigLIP so400m-patch14-384 (`SiglipVisionModel`)."""

    def __init__(self, vision_model: nn.Module, head: nn.Sequential):
        config = vision_model.config
        super().__init__(vision_model, head, config.image_size, "squash", SIGLIP_MEAN, SIGLIP_STD, "aesthetic_v2.5")

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).pooler_output


def _check_width(backbone_width: int, head: nn.Sequential, head_path, backbone_path) -> None:
    head_width = next(m for m in head if isinstance(m, nn.Linear)).in_features
    if head_width != backbone_width:
        raise ValueError(
            f"aesthetic head {head_path} expects {head_width}-wide embeddings but the backbone in "
            f"{backbone_path} gives {backbone_width}: wrong backbone folder for this head?"
        )


@contextmanager
def quiet_transformers():
    """Loading only the vision tower of a full CLIP/SigLIP folder leaves the text weights unused;
    transformers reports that as a long warning table. We check completeness ourselves instead."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _load_vision(model_class, config, folder, device, dtype):
    """Only the vision tower's weights from a transformers folder; every one of them must be there."""
    check_folder_files(Path(folder), f"the {model_class.__name__} backbone: config.json and its weights")
    with quiet_transformers():
        # local_files_only: a folder path never triggers a download attempt.
        model, info = model_class.from_pretrained(
            os.fspath(folder), config=config, local_files_only=True, output_loading_info=True
        )
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(
            f"{folder}: the vision tower does not load completely (missing {missing[:4]}, "
            f"mismatched {mismatched[:4]}): is this the right model folder?"
        )
    return model.to(device=device, dtype=dtype).eval()


def clip_vision_config(folder: str | os.PathLike):
    """CLIPVisionConfig with the projection width of a CLIPModel folder (or of a vision-only folder).

    A CLIPModel config keeps `projection_dim` at the top level; CLIPVisionConfig read from such a
    folder would silently fall back to its default (512), so carry it over explicitly.
    """
    from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig

    with quiet_transformers():
        config = AutoConfig.from_pretrained(os.fspath(folder), local_files_only=True)
    if isinstance(config, CLIPConfig):
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return vision
    if isinstance(config, CLIPVisionConfig):
        return config
    raise ValueError(f"{folder}: expected a CLIP model folder, config.json says model_type={config.model_type!r}")


def siglip_vision_config(folder: str | os.PathLike):
    from transformers import AutoConfig, SiglipConfig, SiglipVisionConfig

    with quiet_transformers():
        # (transformers warns about text-side token ids while parsing; only the vision side matters)
        config = AutoConfig.from_pretrained(os.fspath(folder), local_files_only=True)
    if isinstance(config, SiglipConfig):
        return config.vision_config
    if isinstance(config, SiglipVisionConfig):
        return config
    raise ValueError(f"{folder}: expected a SigLIP model folder, config.json says model_type={config.model_type!r}")


def load_aesthetic_v2(
    clip_folder: str | os.PathLike,
    head_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    preprocess_mode: str = "crop",
) -> AestheticV2Reward:
    """CLIP ViT-L/14 transformers folder + `sac+logos+ava1-l14-linearMSE.pth` -> reward.
    `preprocess_mode` "squash" scores like EasyAnimate's reward trainer."""
    from transformers import CLIPVisionModelWithProjection

    head = load_head(head_path, V2_HEAD_PREFIX, V2_LINEAR_POSITIONS)
    vision = _load_vision(CLIPVisionModelWithProjection, clip_vision_config(clip_folder), clip_folder, device, dtype)
    _check_width(vision.config.projection_dim, head, head_path, clip_folder)
    return AestheticV2Reward(vision, head.to(device), preprocess_mode)


def load_aesthetic_v2_5(
    siglip_folder: str | os.PathLike,
    head_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AestheticV25Reward:
    """SigLIP so400m-patch14-384 transformers folder + `aesthetic_predictor_v2_5.pth` -> reward."""
    from transformers import SiglipVisionModel

    head = load_head(head_path, V2_5_HEAD_PREFIX, V2_5_LINEAR_POSITIONS)
    vision = _load_vision(SiglipVisionModel, siglip_vision_config(siglip_folder), siglip_folder, device, dtype)
    _check_width(vision.config.hidden_size, head, head_path, siglip_folder)
    return AestheticV25Reward(vision, head.to(device))
