"""One entry point for every reward: `load_reward(kind, folder, device, dtype, **options)`.

Each kind knows the exact files it expects inside a `reward_models` folder (ComfyUI's
`models/reward_models`, or any folder for the CLI) and where the public files come from; a
missing file raises `FileNotFoundError` naming every missing path. `expected_files(kind)` is the
same table for documentation.

Layout of a complete folder:

    reward_models/
      HPS_v2_compressed.pt                 hps_v2
      HPS_v2.1_compressed.pt               hps_v2.1
      PickScore_v1/                        pickscore (transformers CLIPModel folder)
      MPS_overall.pth                      mps (plain state dict model.* / cross_model.*), or the
                                           converted MPS_overall.safetensors (preferred if both exist)
      CLIP-ViT-H-14-laion2B-s32B-b79K/     mps, optional tokenizer files (bundled BPE otherwise)
      aesthetic/
        sac+logos+ava1-l14-linearMSE.pth   aesthetic_v2 head
        clip-vit-large-patch14/            aesthetic_v2 backbone (transformers CLIP folder)
        aesthetic_predictor_v2_5.pth       aesthetic_v2.5 head
        siglip-so400m-patch14-384/         aesthetic_v2.5 backbone (transformers SigLIP folder)
      reward_options.json                  optional: per-kind loader options (see below)

`reward_options.json` (optional) maps a kind to loader options, e.g.
`{"hps_v2.1": {"preprocess_mode": "squash"}}`; it is how a folder of non-standard architectures
(the tiny test models) tells the loader their sizes. Options passed to `load_reward` win.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..easyanimate.precision import DTYPE_NAMES
from ..fileio import write_text_atomic
from .base import Reward, WeightedReward
from .combine import normalized_combination
from .ranges import range_for
from .sources import (AESTHETIC_FOLDER, AESTHETIC_V2_5_BACKBONE, AESTHETIC_V2_5_BACKBONE_SOURCE, AESTHETIC_V2_5_HEAD,
                      AESTHETIC_V2_5_HEAD_SOURCE, AESTHETIC_V2_BACKBONE, AESTHETIC_V2_BACKBONE_SOURCE, AESTHETIC_V2_HEAD,
                      AESTHETIC_V2_HEAD_SOURCE, HPS_FILES, HPS_SOURCE, MPS_CHECKPOINT_FILE, MPS_CONVERTED_FILE, MPS_SOURCE,
                      MPS_TOKENIZER_FOLDER, MPS_TOKENIZER_SOURCE, PICKSCORE_FOLDER, PICKSCORE_SOURCE, RAFT_FILES,
                      RAFT_SOURCE, TRANSFORMERS_WEIGHT_FILES)

OPTIONS_FILE = "reward_options.json"


@dataclass(frozen=True)
class ExpectedFile:
    """One file or folder a reward kind reads, relative to the reward_models folder ("/" separated)."""

    path: str
    description: str
    source: str
    # "file"; "model_folder" (transformers: config.json + weights); "tokenizer_folder" (CLIP tokenizer files)
    form: str = "file"
    required: bool = True
    # Other names accepted in place of `path` (same folder), preferred over it when both exist:
    # e.g. the MPS_overall.safetensors that tools/convert_mps_checkpoint.py writes.
    preferred_alternatives: tuple[str, ...] = ()

    @property
    def is_folder(self) -> bool:
        return self.form != "file"

    @property
    def accepted_paths(self) -> tuple[str, ...]:
        """Every accepted name, in the order they are looked for."""
        return self.preferred_alternatives + (self.path,)

    def location(self, folder: str | os.PathLike) -> Path:
        """Where it is in `folder`: the first accepted name present, else the documented `path`."""
        for name in self.accepted_paths:
            where = Path(folder, *name.split("/"))
            if self._present_at(where):
                return where
        return Path(folder, *self.path.split("/"))

    def present(self, folder: str | os.PathLike) -> bool:
        return self._present_at(self.location(folder))

    def _present_at(self, where: Path) -> bool:
        if self.form == "file":
            return where.is_file()
        if self.form == "tokenizer_folder":
            from .clip_text import folder_has_tokenizer

            return where.is_dir() and folder_has_tokenizer(where)
        return (where / "config.json").is_file() and any((where / f).is_file() for f in TRANSFORMERS_WEIGHT_FILES)


@dataclass(frozen=True)
class RewardKind:
    name: str
    description: str
    files: tuple[ExpectedFile, ...]
    # (folder, device, dtype, options) -> Reward; files already checked.
    build: Callable[[Path | None, torch.device, torch.dtype, dict], Reward]
    options: tuple[str, ...] = ()  # option names the loader accepts


# ------------------------------------------------------------------------------ builders


def _resolve_in_folder(folder: Path, value: Any) -> Any:
    """A relative path option (e.g. an open_clip config .json) is relative to the reward folder."""
    if isinstance(value, str) and value.endswith(".json") and not os.path.isabs(value):
        candidate = folder / value
        if candidate.is_file():
            return str(candidate)
    return value


def _build_hps(version: str):
    def build(folder, device, dtype, options):
        from .hps import load_hps

        if "model_name" in options:
            options["model_name"] = _resolve_in_folder(folder, options["model_name"])
        return load_hps(folder / HPS_FILES[version], version=version, device=device, dtype=dtype, **options)

    return build


def _build_pickscore(folder, device, dtype, options):
    from .pickscore import load_pickscore

    return load_pickscore(folder / PICKSCORE_FOLDER, device=device, dtype=dtype, **options)


def _build_mps(folder, device, dtype, options):
    from .mps import load_mps

    tokenizer = KINDS["mps"].files[1]
    if "tokenizer_folder" not in options and tokenizer.present(folder):
        options["tokenizer_folder"] = str(tokenizer.location(folder))
    return load_mps(KINDS["mps"].files[0].location(folder), device=device, dtype=dtype, **options)


def _build_aesthetic_v2(folder, device, dtype, options):
    from .aesthetic import load_aesthetic_v2

    base = folder / AESTHETIC_FOLDER
    return load_aesthetic_v2(base / AESTHETIC_V2_BACKBONE, base / AESTHETIC_V2_HEAD, device, dtype, **options)


def _build_aesthetic_v2_5(folder, device, dtype, options):
    from .aesthetic import load_aesthetic_v2_5

    base = folder / AESTHETIC_FOLDER
    return load_aesthetic_v2_5(base / AESTHETIC_V2_5_BACKBONE, base / AESTHETIC_V2_5_HEAD, device, dtype)


def _build_simple(kind: str):
    def build(folder, device, dtype, options):
        from .simple import SIMPLE_REWARDS

        # Weight-free: dtype does not apply (they compute in float32), only the device of buffers.
        return SIMPLE_REWARDS[kind](**options).to(device)

    return build


VIDEO_OPTIONS = ("frames_per_video", "max_size", "window", "iterations")
RAFT_OPTIONS = ("frames_per_video", "num_flow_updates")
def _raft_file(variant: str) -> ExpectedFile:
    return ExpectedFile(
        f"raft/{variant}.pth",
        f"torchvision {variant} state dict",
        RAFT_SOURCE.format(variant=variant, size=variant.split("_")[1].capitalize(), file=RAFT_FILES[variant]),
        preferred_alternatives=(f"raft/{RAFT_FILES[variant]}",),
    )


def _build_video(what: str, raft: str | None):
    def build(folder, device, dtype, options):
        from .flow import PyramidFlow, load_raft
        from .video import FlowConsistencyReward, MotionReward

        frames_per_video = options.pop("frames_per_video", None)
        detach = {"detach_flow": options.pop("detach_flow")} if "detach_flow" in options else {}
        if raft is None:
            estimator = PyramidFlow(**options)  # weight-free: float32 whatever the dtype
        else:
            estimator = load_raft(_raft_file(raft).location(folder), raft, device, dtype, **options)
        cls = MotionReward if what == "motion" else FlowConsistencyReward
        return cls(estimator, frames_per_video, **detach).to(device)

    return build


def _hps_kind(name: str, version: str) -> RewardKind:
    filename = HPS_FILES[version]
    return RewardKind(
        name,
        f"HPS {version}: open_clip ViT-H-14 fine-tuned on human preferences; cosine(image, prompt), about 0.2-0.35",
        (ExpectedFile(filename, f"HPS {version} checkpoint (full open_clip ViT-H-14)", HPS_SOURCE.format(name=filename)),),
        _build_hps(version),
        ("preprocess_mode", "model_name"),
    )


KINDS: dict[str, RewardKind] = {
    kind.name: kind
    for kind in (
        _hps_kind("hps_v2", "v2"),
        _hps_kind("hps_v2.1", "v2.1"),
        RewardKind(
            "pickscore",
            "PickScore v1: CLIP-H fine-tuned on Pick-a-Pic; 100 * cosine(image, prompt), about 20",
            (ExpectedFile(PICKSCORE_FOLDER, "PickScore v1 transformers CLIPModel folder", PICKSCORE_SOURCE, form="model_folder"),),
            _build_pickscore,
            ("preprocess_mode", "use_logit_scale"),
        ),
        RewardKind(
            "mps",
            "MPS overall: CLIP-H + condition-aware cross model (Kwai-Kolors); prompt-conditioned preference",
            (
                ExpectedFile(
                    MPS_CHECKPOINT_FILE,
                    "MPS overall state dict (model.*, cross_model.*)",
                    MPS_SOURCE,
                    preferred_alternatives=(MPS_CONVERTED_FILE,),
                ),
                ExpectedFile(
                    MPS_TOKENIZER_FOLDER,
                    "CLIP-H tokenizer files (optional: the CLIP BPE bundled with open-clip-torch gives the same ids)",
                    MPS_TOKENIZER_SOURCE,
                    form="tokenizer_folder",
                    required=False,
                ),
            ),
            _build_mps,
            ("preprocess_mode", "use_logit_scale", "condition", "clip_config"),
        ),
        RewardKind(
            "aesthetic_v2",
            "LAION aesthetic predictor v2 (CLIP ViT-L/14 + linear head), about 1-10, prompt ignored",
            (
                ExpectedFile(f"{AESTHETIC_FOLDER}/{AESTHETIC_V2_HEAD}", "aesthetic v2 head", AESTHETIC_V2_HEAD_SOURCE),
                ExpectedFile(
                    f"{AESTHETIC_FOLDER}/{AESTHETIC_V2_BACKBONE}",
                    "CLIP ViT-L/14 transformers folder (vision tower is used)",
                    AESTHETIC_V2_BACKBONE_SOURCE,
                    form="model_folder",
                ),
            ),
            _build_aesthetic_v2,
            ("preprocess_mode",),
        ),
        RewardKind(
            "aesthetic_v2.5",
            "Aesthetic predictor v2.5 (SigLIP so400m-patch14-384 + linear head), about 1-10, prompt ignored",
            (
                ExpectedFile(f"{AESTHETIC_FOLDER}/{AESTHETIC_V2_5_HEAD}", "aesthetic v2.5 head", AESTHETIC_V2_5_HEAD_SOURCE),
                ExpectedFile(
                    f"{AESTHETIC_FOLDER}/{AESTHETIC_V2_5_BACKBONE}",
                    "SigLIP so400m-patch14-384 transformers folder (vision tower is used)",
                    AESTHETIC_V2_5_BACKBONE_SOURCE,
                    form="model_folder",
                ),
            ),
            _build_aesthetic_v2_5,
        ),
        RewardKind("colorfulness", "Hasler-Suesstrunk colourfulness (0..~150), no weights", (), _build_simple("colorfulness"), ("pixel_scale",)),
        RewardKind("saturation", "mean HSV saturation (0..1), no weights", (), _build_simple("saturation")),
        RewardKind("contrast", "RMS contrast of luma (0..0.5), no weights", (), _build_simple("contrast")),
        RewardKind("sharpness", "edge sharpness: coherence-weighted gradient energy of luma (prefers clean edges "
                   "over noise; method 'laplacian' is the noise-prone classic), no weights", (),
                   _build_simple("sharpness"), ("method", "window", "coherence_power")),
        RewardKind(
            "compressibility",
            "minus estimated JPEG bits per pixel (DCT proxy), no weights",
            (),
            _build_simple("compressibility"),
            ("quality", "softness", "bits_per_coefficient"),
        ),
        RewardKind(
            "frame_difference",
            "minus mean difference to neighbouring frames, NOT motion compensated (penalises a pan like flicker), no weights",
            (),
            _build_simple("frame_difference"),
            ("frames_per_video", "metric"),
        ),
        RewardKind(
            "motion",
            "mean optical-flow magnitude between consecutive frames of a video (pixels per frame; weight-free "
            "coarse-to-fine flow)",
            (),
            _build_video("motion", None),
            VIDEO_OPTIONS,
        ),
        RewardKind(
            "temporal_consistency",
            "minus the motion-compensated warp error between consecutive frames (0 = perfectly consistent; "
            "weight-free coarse-to-fine flow)",
            (),
            _build_video("temporal_consistency", None),
            VIDEO_OPTIONS + ("detach_flow",),
        ),
        *(
            RewardKind(
                f"{what}_{variant}",
                f"{'mean optical-flow magnitude' if what == 'motion' else 'minus the motion-compensated warp error'} "
                f"of consecutive frames, flow by torchvision {variant} (frames upsampled to >= 128 px)",
                (_raft_file(variant),),
                _build_video(what, variant),
                RAFT_OPTIONS + (("detach_flow",) if what == "temporal_consistency" else ()),
            )
            for what in ("motion", "temporal_consistency")
            for variant in ("raft_small", "raft_large")
        ),
    )
}

REWARD_KINDS: tuple[str, ...] = tuple(KINDS)


# ------------------------------------------------------------------------------ public API


def _kind(kind: str) -> RewardKind:
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[kind]


def expected_files(kind: str) -> list[ExpectedFile]:
    """The files/folders `kind` reads inside a reward_models folder (empty for weight-free kinds)."""
    return list(_kind(kind).files)


def needs_files(kind: str) -> bool:
    return any(f.required for f in _kind(kind).files)


def missing_files(kind: str, folder: str | os.PathLike) -> list[ExpectedFile]:
    return [f for f in _kind(kind).files if f.required and not f.present(folder)]


def check_files(kind: str, folder: str | os.PathLike | None) -> None:
    """FileNotFoundError naming every missing file of `kind` (exact paths) and where to get it."""
    if not needs_files(kind):
        return
    if folder is None:
        paths = ", ".join(f"reward_models/{f.path}" for f in _kind(kind).files if f.required)
        raise FileNotFoundError(f"reward {kind!r} needs a reward_models folder holding {paths}")
    missing = missing_files(kind, folder)
    if missing:
        lines = [f"reward {kind!r}: missing in {os.fspath(folder)}:"]
        for f in missing:
            what = {"file": "file", "model_folder": "folder with config.json + weights"}.get(f.form, "folder")
            also = "".join(f" (or {Path(folder, *name.split('/'))})" for name in f.preferred_alternatives)
            lines.append(f"  {f.location(folder)}{also}  ({what}: {f.description}; get it from {f.source})")
        raise FileNotFoundError("\n".join(lines))


def read_folder_options(folder: str | os.PathLike | None, kind: str) -> dict:
    if folder is None:
        return {}
    path = Path(folder, OPTIONS_FILE)
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        table = json.load(handle)
    options = table.get(kind, {})
    if not isinstance(options, dict):
        raise ValueError(f"{path}: options for {kind!r} must be an object, got {type(options).__name__}")
    return dict(options)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype, a name ("bf16", "float32", ...), None (float32) or "auto": bfloat16 on a CUDA device
    that supports it (half the memory of CLIP-H), else float32 (CPUs are fastest and exact in it)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def load_reward(
    kind: str,
    folder: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    **options: Any,
) -> Reward:
    """Build the reward `kind` from files in `folder` (a reward_models folder); frozen, eval mode.

    `dtype`: a torch dtype, a name, or "auto" (see `resolve_dtype`).
    `options` go to the kind's loader (see `KINDS[kind].options`), on top of the folder's
    reward_options.json. Unknown options are an error rather than silently ignored.
    """
    spec = _kind(kind)
    check_files(kind, folder)
    merged = read_folder_options(folder, kind)
    merged.update(options)
    unknown = sorted(set(merged) - set(spec.options))
    if unknown:
        raise TypeError(f"reward {kind!r} does not take options {unknown}; it takes {list(spec.options) or 'none'}")
    device = torch.device(device)
    reward = spec.build(Path(folder) if folder is not None else None, device, resolve_dtype(dtype, device),
                        dict(merged))
    reward.typical_range = range_for(kind, merged)  # for normalised combinations (reward/combine.py)
    reward.kind, reward.loader_options = kind, dict(merged)  # for the trainer's loss presets
    return reward.freeze()


# What EasyAnimate's own reward trainer (easyanimate/reward/reward_fn.py) computes, where the
# pack's default differs: PickScore and MPS as the plain cosine (no logit scale: its `|r - 1|`
# loss with max_reward 1 assumes that scale), and every image squashed to 224x224 (both sides
# resized, aspect ratio not kept) instead of each model's own crop / letterbox.
EASYANIMATE_OPTIONS: dict[str, dict] = {
    "hps_v2": {"preprocess_mode": "squash"},
    "hps_v2.1": {"preprocess_mode": "squash"},
    "pickscore": {"use_logit_scale": False},
    "mps": {"use_logit_scale": False, "preprocess_mode": "squash"},
    "aesthetic_v2": {"preprocess_mode": "squash"},
}
SCORINGS = ("pack", "easyanimate")


def scoring_options(kind: str, scoring: str = "pack") -> dict:
    """Loader options for a scoring convention: "pack" (each model as its authors score it; the
    default) or "easyanimate" (as EasyAnimate's reward trainer scores it)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    return dict(EASYANIMATE_OPTIONS.get(kind, {})) if scoring == "easyanimate" else {}


def expected_files_markdown() -> str:
    """A Markdown table of every kind's files, for the README."""
    rows = ["| kind | path inside reward_models | what | source |", "|---|---|---|---|"]
    for spec in KINDS.values():
        if not spec.files:
            rows.append(f"| `{spec.name}` | (none) | {spec.description} | built in |")
        for f in spec.files:
            path = f"`{f.path}/`" if f.is_folder else f"`{f.path}`"
            path += "".join(f" or `{name}`" for name in f.preferred_alternatives)
            optional = " (optional)" if not f.required else ""
            rows.append(f"| `{spec.name}` | {path}{optional} | {f.description} | {f.source} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------ combinations

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_TERM = re.compile(
    rf"\s*(?P<sign>[+-])?\s*(?:(?P<coef>{_NUMBER})\s*\*?\s*)?(?P<name>[A-Za-z_][\w.]*?)\s*(?:\*\s*(?P<post>{_NUMBER}))?\s*(?=[+-]|$)"
)


def parse_combination_terms(text: str) -> list[tuple[str, float]]:
    """"hps_v2.1 + 0.5*aesthetic_v2 - temporal_consistency" -> [(name, weight), ...].

    A term is [sign] [number ['*']] name ['*' number]; terms after the first need a sign.
    """
    terms: list[tuple[str, float]] = []
    position, text = 0, text.strip()
    if not text:
        raise ValueError("empty reward combination")
    while position < len(text):
        match = _TERM.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"cannot parse reward combination {text!r} at position {position}: {text[position:]!r}")
        if terms and match.group("sign") is None:
            raise ValueError(f"reward combination {text!r}: expected '+' or '-' before {text[position:]!r}")
        weight = -1.0 if match.group("sign") == "-" else 1.0
        if match.group("coef"):
            weight *= float(match.group("coef"))
        if match.group("post"):
            weight *= float(match.group("post"))
        terms.append((match.group("name"), weight))
        position = match.end()
    return terms


def parse_combination(text: str, rewards: Mapping[str, Reward], normalization: str = "none") -> WeightedReward:
    """Build a WeightedReward from a formula over named, already loaded rewards; each term
    normalised first unless `normalization` is "none" (reward/combine.py)."""
    terms = []
    for name, weight in [(text, 1.0)] if text in KINDS else parse_combination_terms(text):
        if name not in rewards:
            raise KeyError(f"reward combination {text!r} names {name!r}; available: {', '.join(rewards)}")
        terms.append((rewards[name], weight))
    return normalized_combination(terms, normalization)


def load_reward_expression(text: str, folder: str | os.PathLike | None, device: torch.device | str = "cpu",
                           dtype: torch.dtype | str = torch.float32, normalization: str = "none",
                           scoring: str = "pack") -> Reward:
    """A reward kind ("hps_v2.1") or a weighted combination ("hps_v2.1 + 0.5*aesthetic_v2"), every
    kind it names loaded once from `folder` under the `scoring` convention; frozen. A single kind
    without normalisation is the kind's own reward, not a one-term combination."""
    names = [text] if text in KINDS else list(dict.fromkeys(name for name, _ in parse_combination_terms(text)))
    loaded = {name: load_reward(name, folder, device, dtype, **scoring_options(name, scoring)) for name in names}
    if text in KINDS and normalization == "none":
        return loaded[text]
    return parse_combination(text, loaded, normalization).freeze()


# ------------------------------------------------------------------------------ tiny folder


def write_tiny_reward_models(dest: str | os.PathLike, seed: int = 0) -> Path:
    """A complete reward_models folder with tiny random weights for every kind (tests, offline demo).

    Same file names and formats as the real folder; `reward_options.json` tells the loaders the
    tiny architectures (an open_clip config file for HPS, a CLIP config for MPS).
    """
    from .tiny_aesthetic import (
        write_tiny_aesthetic_head,
        write_tiny_clip_folder,
        write_tiny_siglip_folder,
    )
    from .tiny_clip import (
        TINY_HF_CLIP_CONFIG,
        write_tiny_hps_checkpoint,
        write_tiny_mps_checkpoint,
        write_tiny_pickscore_folder,
    )

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _, open_clip_config = write_tiny_hps_checkpoint(dest, "v2", seed)
    write_tiny_hps_checkpoint(dest, "v2.1", seed + 1)
    write_tiny_pickscore_folder(dest / PICKSCORE_FOLDER, seed + 2)
    write_tiny_mps_checkpoint(dest, seed + 3)
    aesthetic = dest / AESTHETIC_FOLDER
    write_tiny_clip_folder(aesthetic / AESTHETIC_V2_BACKBONE, seed + 4)
    write_tiny_aesthetic_head(aesthetic / AESTHETIC_V2_HEAD, "v2", seed=seed + 5)
    write_tiny_siglip_folder(aesthetic / AESTHETIC_V2_5_BACKBONE, seed + 6)
    write_tiny_aesthetic_head(aesthetic / AESTHETIC_V2_5_HEAD, "v2.5", seed=seed + 7)
    options = {
        "hps_v2": {"model_name": os.path.basename(open_clip_config)},
        "hps_v2.1": {"model_name": os.path.basename(open_clip_config)},
        "mps": {"clip_config": TINY_HF_CLIP_CONFIG},
    }
    write_text_atomic(dest / OPTIONS_FILE, json.dumps(options, indent=2))
    return dest
