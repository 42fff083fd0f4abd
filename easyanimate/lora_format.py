"""LoRA files for the EasyAnimate transformer: read, validate against the loaded model, write.

Two on-disk formats are read:
- kohya style, as the official EasyAnimate reward LoRAs ship:
  `lora_unet__<module path with . -> _>.lora_down.weight` (r, in), `.lora_up.weight` (out, r),
  `.alpha` (scalar), with ORIGINAL EasyAnimate module paths (`attn2.to_q`, ...); optional
  `lora_te_<...>` keys for the first text encoder.
- PEFT / diffusers style: `<module path>.lora_A.weight` (r, in), `.lora_B.weight` (out, r), with
  or without a `base_model.model.` / `transformer.` prefix, alpha from `.alpha` keys, the file's
  metadata or a PEFT `adapter_config.json` beside it (else alpha = rank).

Flattened kohya names are resolved with a table built from the model's own `named_modules()`
(flattened name -> module path), so names with underscores (`to_out_0`, `txt_ff`, `text_proj_t5`)
are never guessed. In memory every target is keyed by its DIFFUSERS module path.
Files are always written in the official kohya format with original paths.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..fileio import save_safetensors_atomic
from .keymap import ORIGINAL_ONLY_PREFIXES, diffusers_to_original, is_original_only, original_to_diffusers

log = logging.getLogger(__name__)

KOHYA_TRANSFORMER_PREFIX = "lora_unet"
KOHYA_TEXT_ENCODER_PREFIX = "lora_te"
PEFT_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.")
MAX_STRENGTH = 10.0  # the Apply LoRA node's range is -MAX_STRENGTH..MAX_STRENGTH (sweeps too)
# Metadata the pack writes into its own LoRA files: the diffusers module paths they target (JSON
# list) and, when known, the number of transformer blocks of the model they were made for.
TARGETS_KEY = "easyanimate_reward.lora_targets"
BLOCKS_KEY = "easyanimate_reward.transformer_blocks"
_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")

_KOHYA_RE = re.compile(r"^(?P<prefix>lora_unet|lora_te[12]?)_+(?P<flat>.+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
# dotted module path + (lora_A|lora_B|lora_down|lora_up|lora.down|lora.up) [+ adapter name] + .weight, or + .alpha
_DOTTED_RE = re.compile(
    r"^(?P<path>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)(\.(?P<adapter>[^.]+))?\.weight$"
)
_DOTTED_ALPHA_RE = re.compile(r"^(?P<path>.+)\.alpha$")
_DOWN_PARTS = {"lora_A", "lora_down", "lora.down"}
# Flattened (kohya) names of original-only layers, e.g. "ref_proj" or "clip_proj_1".
_ORIGINAL_ONLY_FLAT = re.compile(rf"^({'|'.join(ORIGINAL_ONLY_PREFIXES)})(_|$)")


class LoraMismatchError(ValueError):
    """A LoRA file does not fit the loaded transformer (or is not a LoRA). The message says why."""


class NotALoraError(LoraMismatchError):
    """The file holds no LoRA keys at all (a full checkpoint, or something else)."""


@dataclass(eq=False)
class LoraModule:
    """The low-rank update of one Linear: delta W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]


@dataclass(eq=False)
class LoraWeights:
    """A parsed LoRA. `modules` maps DIFFUSERS module paths of the transformer to their update;
    `text_encoder_modules` maps flattened module names of the first text encoder (kohya `lora_te_`
    keys, without the prefix) to theirs. Identity, not value, equality: the patcher compares stacks
    with `is`, and shallow copies made by `with_mode` share `modules` (see `key`)."""

    modules: dict[str, LoraModule]
    text_encoder_modules: dict[str, LoraModule] = field(default_factory=dict)
    source: str = ""
    format: str = "kohya"  # "kohya" | "peft" | "tensors"
    metadata: dict[str, str] = field(default_factory=dict)
    mode: str | None = None  # preferred patch mode ("fused" | "unfused"); None = the patcher's default

    def with_mode(self, mode: str | None) -> "LoraWeights":
        """A view with another preferred patch mode; shares every tensor."""
        return replace(self, mode=mode)

    @property
    def key(self) -> int:
        """Stays the same for views made by `with_mode` (they share `modules`)."""
        return id(self.modules)

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}


def flatten(path: str) -> str:
    return path.replace(".", "_")


def lora_target_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    """Module paths of the transformer that a LoRA may target (Linear layers)."""
    return {name: m for name, m in transformer.named_modules() if isinstance(m, nn.Linear)}


def flat_name_table(transformer: nn.Module) -> dict[str, str]:
    """Flattened name -> diffusers module path, for both diffusers and original naming."""
    table: dict[str, str] = {}
    for path in lora_target_modules(transformer):
        for name in {flatten(path), flatten(diffusers_to_original(path))}:
            other = table.setdefault(name, path)
            if other != path:  # would make a kohya key ambiguous; does not happen for this class
                raise ValueError(f"flattened name {name!r} is ambiguous: {other!r} and {path!r}")
    return table


# ----------------------------------------------------------------------------------------------
# reading


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:  # safetensors raises several types for a bad header
            raise LoraMismatchError(f"cannot read LoRA file {path}: {e}. The file is corrupt or incomplete.") from e
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise NotALoraError(f"{path} does not hold a flat dict of tensors; it is not a LoRA")
        return dict(state), {}
    raise LoraMismatchError(f"{path}: unsupported LoRA file type {path.suffix!r} (use .safetensors)")


def _describe_non_lora(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    keys = sorted(tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    looks_transformer = any(re.match(r"^(model\.|transformer\.|model\.diffusion_model\.)?transformer_blocks\.\d+\.", k) for k in keys)
    what = ("it looks like a full transformer checkpoint; model weights belong in a model folder "
            "under models/easyanimate/, not in models/loras/") if looks_transformer else "it is not a LoRA"
    return (f"{path} holds {len(keys)} tensors ({nbytes / 2**30:.2f} GiB) and no LoRA keys "
            f"(lora_down/lora_up or lora_A/lora_B): {what}. First keys: {', '.join(keys[:4])}")


@dataclass
class _RawEntry:
    """One LoRA target as found in the file, before name resolution."""

    name: str  # flattened kohya name or dotted path
    dotted: bool
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def _group_keys(path: Path, tensors: dict[str, torch.Tensor]):
    """The file's keys grouped into entries: ({name: transformer entry}, {name: text-encoder
    entry}, "kohya" | "peft" | None), checked by _check_grouped."""
    transformer: dict[str, _RawEntry] = {}
    text_encoder: dict[str, _RawEntry] = {}
    skipped_te2 = 0
    unknown: list[str] = []
    alphas: dict[str, float] = {}
    fmt = None
    for key, value in tensors.items():
        m = _KOHYA_RE.match(key)
        if m:
            fmt = fmt or "kohya"
            if m["prefix"] == "lora_te2":
                skipped_te2 += 1
                continue
            target = transformer if m["prefix"] == "lora_unet" else text_encoder
            entry = target.setdefault(m["flat"], _RawEntry(m["flat"], dotted=False))
            if m["part"] == "alpha":
                entry.alpha = float(value.float().item())
            elif m["part"] == "lora_down.weight":
                entry.down = value
            else:
                entry.up = value
            continue
        m = _DOTTED_RE.match(key)
        if m:
            fmt = fmt or "peft"
            entry = transformer.setdefault(m["path"], _RawEntry(m["path"], dotted=True))
            if m["part"] in _DOWN_PARTS:
                entry.down = value
            else:
                entry.up = value
            continue
        m = _DOTTED_ALPHA_RE.match(key)
        if m and value.numel() == 1:
            alphas[m["path"]] = float(value.float().item())
            continue
        unknown.append(key)
    _check_grouped(path, tensors, transformer, text_encoder, unknown, skipped_te2)
    for name, alpha in alphas.items():
        if name in transformer:
            transformer[name].alpha = alpha
    return transformer, text_encoder, fmt


def _check_grouped(path: Path, tensors: dict[str, torch.Tensor], transformer: dict[str, _RawEntry],
                   text_encoder: dict[str, _RawEntry], unknown: list[str], skipped_te2: int) -> None:
    """Refuses a file with nothing for the transformer, with keys other than down/up/alpha, or with
    an entry lacking a factor or holding non-2-D ones."""
    if not transformer and not text_encoder:
        if skipped_te2:
            raise LoraMismatchError(f"{path} only has keys for a second text encoder (lora_te2_); "
                                    "nothing in it applies to the EasyAnimate transformer")
        raise NotALoraError(_describe_non_lora(path, tensors))
    if unknown:
        raise LoraMismatchError(
            f"{path} has {len(unknown)} keys that are not plain LoRA down/up/alpha tensors "
            f"(DoRA, LoHa, LoKr and bias updates are not supported): {', '.join(sorted(unknown)[:5])}")
    if skipped_te2:
        log.warning("%s: ignoring %d lora_te2_ keys (second text encoder is not patched)", path, skipped_te2)
    for entries in (transformer, text_encoder):
        for entry in entries.values():
            if entry.down is None or entry.up is None:
                missing = "down (lora_down / lora_A)" if entry.down is None else "up (lora_up / lora_B)"
                raise LoraMismatchError(f"{path}: LoRA target {entry.name!r} has no {missing} tensor")
            if entry.down.ndim != 2 or entry.up.ndim != 2:
                raise LoraMismatchError(
                    f"{path}: LoRA target {entry.name!r} has {entry.down.ndim}-D tensors; only Linear "
                    "LoRAs (2-D down/up) are supported")


def _peft_alpha_config(path: Path, metadata: dict[str, str]) -> tuple[float | None, dict[str, float]]:
    """(default lora_alpha, per-module alpha pattern) from safetensors metadata or adapter_config.json."""
    sources = []
    if "lora_adapter_metadata" in metadata:
        try:
            sources.append(json.loads(metadata["lora_adapter_metadata"]))
        except json.JSONDecodeError:
            pass
    config_file = path.parent / "adapter_config.json"
    if config_file.is_file():
        try:
            sources.append(json.loads(config_file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s is not valid JSON; ignoring it", config_file)
    for src in sources:
        alpha = next((v for k, v in src.items() if k.endswith("lora_alpha")), None)
        pattern = next((v for k, v in src.items() if k.endswith("alpha_pattern")), None) or {}
        if alpha is not None:
            return float(alpha), {str(k): float(v) for k, v in pattern.items()}
    return None, {}


def _strip_peft_prefix(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PEFT_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


# ----------------------------------------------------------------------------------------------
# what a LoRA / a model looks like (for error messages)


def _shape_summary_from_flat(entries: Mapping[str, tuple[int, int]]) -> dict:
    """Infer transformer sizes from flattened target names -> (in, out) of each LoRA."""
    info: dict = {}
    blocks = {int(m.group(1)) for n in entries if (m := re.match(r"^transformer_blocks_(\d+)_", n))}
    if blocks:
        info["layers"] = max(blocks) + 1
    for name, (fan_in, fan_out) in entries.items():
        if re.match(r"^transformer_blocks_\d+_attn1_to_q$", name):
            info.setdefault("width", fan_in)
        elif re.match(r"^transformer_blocks_\d+_ff_net_0_proj$", name):
            info.setdefault("ff_inner", fan_out)
        elif re.match(r"^transformer_blocks_\d+_norm1_linear$", name):
            info.setdefault("time_embed_dim", fan_in)
        elif name == "proj_out":
            info.setdefault("width", fan_in)
        elif name == "text_proj":
            info["text_input"] = fan_in
        elif name == "text_proj_t5":
            info["t5_input"] = fan_in
    return info


def _size_words(info: dict) -> str:
    if not info:
        return "no EasyAnimate transformer module names"
    words = []
    if "width" in info:
        words.append(f"width {info['width']}")
    if "layers" in info:
        words.append(f"{info['layers']} layers")
    if "ff_inner" in info:
        words.append(f"feed-forward {info['ff_inner']}")
    if "text_input" in info:
        words.append(f"text_proj input {info['text_input']}")
    words.append(f"T5 projection input {info['t5_input']}" if "t5_input" in info else "no T5 projection")
    guess = []
    if info.get("width") == 3072:
        guess.append({48: "12b"}.get(info.get("layers"), "7b?" if info.get("layers", 48) < 48 else "?"))
    if "t5_input" in info:
        guess.append("V5 (Bert + T5)")
    elif info.get("text_input") == 3584:
        guess.append("V5.1 (Qwen2-VL)")
    text = ", ".join(words)
    return f"{text} [EasyAnimate {' '.join(guess)}]" if guess else text


def describe_transformer(transformer: nn.Module) -> str:
    shapes = {flatten(diffusers_to_original(p)): (m.in_features, m.out_features)
              for p, m in lora_target_modules(transformer).items()}
    return _size_words(_shape_summary_from_flat(shapes))


def _flat_shapes(entries: Mapping[str, _RawEntry]) -> dict[str, tuple[int, int]]:
    out = {}
    for entry in entries.values():
        name = entry.name
        if entry.dotted:
            name = flatten(diffusers_to_original(original_to_diffusers(_strip_peft_prefix(name))))
        out[name] = (entry.down.shape[1], entry.up.shape[0])
    return out


# ----------------------------------------------------------------------------------------------
# public: load / validate


def load_lora_file(path: str | os.PathLike, transformer: nn.Module) -> LoraWeights:
    """Read a LoRA file (kohya or PEFT format) and check that every target exists in `transformer`
    with matching shapes. Raises LoraMismatchError / NotALoraError with a clear message otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist (LoRAs belong in models/loras/)")
    tensors, metadata = _read_tensors(path)
    raw, raw_te, fmt = _group_keys(path, tensors)
    del tensors
    targets = lora_target_modules(transformer)
    match = _match_modules(path, raw, targets, flat_name_table(transformer), fmt, metadata)
    if match.unmatched or match.wrong_shapes or not match.modules:
        raise LoraMismatchError(_mismatch_message(path, raw, match, transformer))
    if match.skipped:
        log.warning("%s: skipping %d LoRA modules of original-only layers (%s)", path, len(match.skipped),
                    match.skipped[0])
    _check_coverage(path, match.modules, targets, metadata)
    text_encoder_modules = _text_encoder_modules(path, raw_te)
    return LoraWeights(match.modules, text_encoder_modules, source=str(path), format=fmt or "kohya",
                       metadata=metadata)


@dataclass
class _Match:
    """The file's transformer entries sorted out against the model."""

    modules: dict[str, LoraModule] = field(default_factory=dict)  # diffusers path -> LoRA, shapes checked
    unmatched: list[str] = field(default_factory=list)  # names with no Linear of this model
    skipped: list[str] = field(default_factory=list)  # layers only the original EasyAnimate code has
    wrong_shapes: list[str] = field(default_factory=list)  # one line per entry that does not fit


def _resolve_path(entry: _RawEntry, targets: Mapping[str, nn.Module], table: Mapping[str, str]
                  ) -> tuple[str | None, bool]:
    """(diffusers module path or None, whether the entry targets an original-only layer)."""
    if entry.dotted:
        dotted = _strip_peft_prefix(entry.name)
        module_path = dotted if dotted in targets else original_to_diffusers(dotted)
        return module_path, module_path not in targets and is_original_only(diffusers_to_original(module_path))
    module_path = table.get(entry.name)
    return module_path, module_path not in targets and bool(_ORIGINAL_ONLY_FLAT.match(entry.name))


def _shape_problem(entry: _RawEntry, module_path: str, linear: nn.Module) -> str | None:
    if entry.down.shape[0] != entry.up.shape[1]:
        return f"{module_path}: down {tuple(entry.down.shape)} and up {tuple(entry.up.shape)} disagree on the rank"
    if entry.down.shape[1] != linear.in_features or entry.up.shape[0] != linear.out_features:
        return (f"{module_path}: LoRA {entry.down.shape[1]}->{entry.up.shape[0]} vs model "
                f"{linear.in_features}->{linear.out_features}")
    return None


def _match_modules(path: Path, raw: Mapping[str, _RawEntry], targets: Mapping[str, nn.Module],
                   table: Mapping[str, str], fmt: str | None, metadata: dict[str, str]) -> _Match:
    default_alpha, alpha_pattern = _peft_alpha_config(path, metadata) if fmt == "peft" else (None, {})
    match = _Match()
    for entry in raw.values():
        module_path, original_only = _resolve_path(entry, targets, table)
        if module_path not in targets:
            (match.skipped if original_only else match.unmatched).append(entry.name)
            continue
        problem = _shape_problem(entry, module_path, targets[module_path])
        if problem is not None:
            match.wrong_shapes.append(problem)
            continue
        alpha = entry.alpha
        if alpha is None and fmt == "peft":
            alpha = next((v for k, v in alpha_pattern.items() if module_path.endswith(k)), default_alpha)
        if alpha is None:
            alpha = float(entry.down.shape[0])  # no alpha anywhere: scale 1, as the reference merge does
        _check_values(path, entry.name, entry.down, entry.up, alpha)
        match.modules[module_path] = LoraModule(entry.down, entry.up, float(alpha))
    return match


def _mismatch_message(path: Path, raw: Mapping[str, _RawEntry], match: _Match, transformer: nn.Module) -> str:
    parts = [f"LoRA {path.name} does not fit the loaded EasyAnimate transformer: "
             f"{len(match.modules)} of {len(raw)} LoRA modules match by name and shape"]
    if match.unmatched:
        parts.append(f"{len(match.unmatched)} names have no module in this model "
                     f"(e.g. {', '.join(sorted(match.unmatched)[:3])})")
    if match.wrong_shapes:
        parts.append(f"{len(match.wrong_shapes)} shapes differ (e.g. {'; '.join(match.wrong_shapes[:3])})")
    parts.append(f"the file looks made for: {_size_words(_shape_summary_from_flat(_flat_shapes(raw)))}")
    parts.append(f"the loaded model is: {describe_transformer(transformer)}")
    if not match.modules and match.unmatched and not any(
            n.startswith("transformer_blocks") for n in (flatten(_strip_peft_prefix(u)) for u in match.unmatched)):
        parts.append("the names do not look like EasyAnimate at all: it was probably made for another architecture")
    return "; ".join(parts) + "."


def _text_encoder_modules(path: Path, raw_te: Mapping[str, _RawEntry]) -> dict[str, LoraModule]:
    """The lora_te_ part, checked and kept (saved again on export); the sampler patches only the
    transformer."""
    modules = {}
    for entry in raw_te.values():
        alpha = entry.alpha if entry.alpha is not None else entry.down.shape[0]
        _check_values(path, entry.name, entry.down, entry.up, alpha)
        modules[entry.name] = LoraModule(entry.down, entry.up, float(alpha))
    if modules:
        log.warning("%s: %d text-encoder modules (lora_te_) are not applied; only the transformer part is",
                    path, len(modules))
    return modules


def _check_values(path: Path, name: str, down: torch.Tensor, up: torch.Tensor, alpha) -> None:
    """Rank 0 (alpha / rank divides by zero), NaN/inf in the factors or in alpha: refused at load."""
    if down.shape[0] == 0 or up.shape[1] == 0:
        raise LoraMismatchError(f"{path}: LoRA target {name!r} has rank 0 (empty down/up tensors); "
                                "the file is broken")
    if not math.isfinite(float(alpha)):
        raise LoraMismatchError(f"{path}: LoRA target {name!r} has alpha {float(alpha)}; alpha must be finite")
    for part, tensor in (("down", down), ("up", up)):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoraMismatchError(f"{path}: LoRA target {name!r} has NaN/inf values in its {part} tensor; "
                                    "the file is broken (a diverged training run?)")


def _block_kinds(paths) -> dict[int, set[str]]:
    """{block index: module paths inside the block} for `transformer_blocks.<i>.<rest>` paths."""
    kinds: dict[int, set[str]] = {}
    for p in paths:
        m = _BLOCK_RE.match(p)
        if m:
            kinds.setdefault(int(m.group(1)), set()).add(m.group(2))
    return kinds


def _ranges(numbers) -> str:
    numbers, spans = sorted(numbers), []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _check_coverage(path: Path, modules: Mapping[str, "LoraModule"], targets: Mapping[str, nn.Module],
                    metadata: Mapping[str, str]) -> None:
    """A LoRA made for a shallower model of the same width is refused; genuine partial LoRAs pass,
    with a log line saying which modules they touch.

    Files the pack wrote declare their targets (TARGETS_KEY) and maybe the model depth (BLOCKS_KEY):
    they are judged by that. Other files: one that covers every LoRA-able module of each of its
    blocks, blocks 0..N-1, while the model has M > N blocks, was made for an N-block model."""
    model_kinds = _block_kinds(targets)
    model_blocks = len(model_kinds)
    file_kinds = _block_kinds(modules)
    if TARGETS_KEY in metadata:
        try:
            declared = set(json.loads(metadata[TARGETS_KEY]))
        except (json.JSONDecodeError, TypeError) as e:
            raise LoraMismatchError(f"{path}: metadata {TARGETS_KEY} is not a JSON list ({e})") from e
        if declared != set(modules):
            missing, extra = sorted(declared - set(modules)), sorted(set(modules) - declared)
            raise LoraMismatchError(
                f"{path}: the file says it targets {len(declared)} modules but holds {len(modules)} that fit "
                f"(missing {missing[:3]}, not declared {extra[:3]}); it is incomplete or was edited")
        if BLOCKS_KEY in metadata and str(metadata[BLOCKS_KEY]).strip() != str(model_blocks):
            raise LoraMismatchError(f"LoRA {path.name} was made for {metadata[BLOCKS_KEY]} blocks, "
                                    f"model has {model_blocks}")
    elif file_kinds and model_blocks:
        depth = max(file_kinds) + 1
        full = (set(file_kinds) == set(range(depth))
                and all(file_kinds[b] == model_kinds.get(b, set()) for b in range(depth)))
        if full and depth < model_blocks:
            raise LoraMismatchError(
                f"LoRA {path.name} was made for {depth} blocks, model has {model_blocks}: it covers every "
                f"module of blocks 0-{depth - 1} and none after, so it belongs to a shallower model of the "
                "same width (e.g. a 7b LoRA on the 12b model)")
    if len(modules) < len(targets):
        kinds = sorted(set().union(*file_kinds.values())) if file_kinds else []
        others = sorted(p for p in modules if not _BLOCK_RE.match(p))
        log.info("%s: partial LoRA, touches %d of %d modules: blocks %s of %d (%s)%s", path, len(modules),
                 len(targets), _ranges(file_kinds) or "none", model_blocks, ", ".join(kinds[:8]) or "-",
                 f"; outside blocks: {', '.join(others[:8])}" if others else "")


def resolve_text_encoder_modules(weights: LoraWeights, text_encoder: nn.Module) -> dict[str, LoraModule]:
    """Map the kohya `lora_te_` entries onto module paths of the first text encoder (same
    flattened-name table approach), checking shapes. Empty when the LoRA has no such entries."""
    if not weights.text_encoder_modules:
        return {}
    linears = {flatten(n): (n, m) for n, m in text_encoder.named_modules() if isinstance(m, nn.Linear)}
    resolved, problems = {}, []
    for flat, lora in weights.text_encoder_modules.items():
        if flat not in linears:
            problems.append(f"{flat}: no such Linear")
            continue
        name, linear = linears[flat]
        if (lora.in_features, lora.out_features) != (linear.in_features, linear.out_features):
            problems.append(f"{name}: LoRA {lora.in_features}->{lora.out_features} vs model "
                            f"{linear.in_features}->{linear.out_features}")
            continue
        resolved[name] = lora
    if problems:
        raise LoraMismatchError(
            f"{weights.source}: {len(resolved)} of {len(weights.text_encoder_modules)} text-encoder LoRA modules "
            f"fit {type(text_encoder).__name__}; {'; '.join(problems[:3])}")
    return resolved


def text_encoder_weights(weights: LoraWeights, text_encoder: nn.Module) -> LoraWeights:
    """The `lora_te_` part of a LoRA as LoraWeights keyed by the text encoder's module paths, so a
    second LoraPatcher can patch the text encoder exactly like the transformer. The LoraModule
    objects are shared, so re-syncing an unchanged stack rewrites nothing."""
    return LoraWeights(resolve_text_encoder_modules(weights, text_encoder), source=weights.source,
                       format=weights.format, metadata=weights.metadata, mode=weights.mode)


# ----------------------------------------------------------------------------------------------
# building / writing


def weights_from_tensors(
    tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float | Mapping[str, float],
    text_encoder: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> LoraWeights:
    """LoraWeights from {diffusers module path: (down (r, in), up (out, r))}, e.g. a trainer's
    adapters. Tensors are detached and copied to CPU, so later optimiser steps do not change them.
    `alpha` is one number or one per path. `text_encoder` is keyed by flattened module names."""

    def snapshot(down: torch.Tensor, up: torch.Tensor, a: float) -> LoraModule:
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise ValueError(f"down {tuple(down.shape)} / up {tuple(up.shape)} are not a (r, in) / (out, r) pair "
                             "with rank >= 1")
        return LoraModule(down.detach().to("cpu", copy=True), up.detach().to("cpu", copy=True), float(a))

    def alpha_for(path: str) -> float:
        return alpha[path] if isinstance(alpha, Mapping) else alpha

    modules = {path: snapshot(d, u, alpha_for(path)) for path, (d, u) in tensors.items()}
    te = {name: snapshot(d, u, alpha_for(name)) for name, (d, u) in (text_encoder or {}).items()}
    return LoraWeights(modules, te, source="tensors", format="tensors", metadata=dict(metadata or {}))


def kohya_state_dict(weights: LoraWeights, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The official EasyAnimate key layout (original module paths), tensors cast to `dtype`."""
    state: dict[str, torch.Tensor] = {}

    def put(prefix: str, flat: str, lora: LoraModule) -> None:
        name = f"{prefix}_{flat}"
        state[f"{name}.lora_down.weight"] = lora.down.detach().to("cpu", dtype).contiguous()
        state[f"{name}.lora_up.weight"] = lora.up.detach().to("cpu", dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=dtype)

    for path, lora in weights.modules.items():
        # "lora_unet" + "_" + "_<flat>": the official trainer joins an empty root name, hence "__".
        put(KOHYA_TRANSFORMER_PREFIX + "_", flatten(diffusers_to_original(path)), lora)
    for flat, lora in weights.text_encoder_modules.items():
        put(KOHYA_TEXT_ENCODER_PREFIX, flat, lora)
    return state


def diffusers_state_dict(weights: LoraWeights, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The diffusers / PEFT key layout: `transformer.<diffusers path>.lora_A.weight` (r, in) and
    `.lora_B.weight` (out, r). Those files carry no alpha (readers take alpha = rank), so the
    alpha / rank factor is folded into lora_B: every reader then computes the same update."""
    if weights.text_encoder_modules:
        raise ValueError("the diffusers layout here is for transformer LoRAs; this one also has text-encoder entries")
    state: dict[str, torch.Tensor] = {}
    for path, lora in weights.modules.items():
        scale = lora.alpha / lora.down.shape[0]
        state[f"transformer.{path}.lora_A.weight"] = lora.down.detach().to("cpu", dtype).contiguous()
        state[f"transformer.{path}.lora_B.weight"] = (lora.up.detach().float() * scale).to("cpu", dtype).contiguous()
    return state


LORA_FILE_STYLES = ("kohya", "diffusers")


def save_lora_file(
    path: str | os.PathLike,
    weights: LoraWeights,
    dtype: torch.dtype = torch.bfloat16,
    metadata: Mapping[str, str] | None = None,
    style: str = "kohya",
    transformer_blocks: int | None = None,
) -> Path:
    """Write `weights` as a safetensors file, atomically: `style` "kohya" is the official
    EasyAnimate format (original module paths, .alpha keys); "diffusers" is the PEFT/diffusers
    layout (lora_A / lora_B on diffusers module paths, alpha folded into lora_B). The metadata
    records the targeted modules and, with `transformer_blocks` (the model's depth), which model
    the file is for: loading judges the file by them."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    if style not in LORA_FILE_STYLES:
        raise ValueError(f"unknown LoRA file style {style!r}; choose one of {', '.join(LORA_FILE_STYLES)}")
    state = kohya_state_dict(weights, dtype) if style == "kohya" else diffusers_state_dict(weights, dtype)
    ranks = sorted(weights.ranks)
    alphas = sorted({m.alpha for m in weights.modules.values()})
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "ss_network_alpha": str(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "format": "pt",
    }
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    meta[TARGETS_KEY] = json.dumps(sorted(weights.modules))  # always what this file holds
    blocks = transformer_blocks if transformer_blocks is not None else weights.metadata.get(BLOCKS_KEY)
    if blocks is not None:
        meta[BLOCKS_KEY] = str(int(blocks))
    save_safetensors_atomic(path, state, metadata=meta)
    return path
