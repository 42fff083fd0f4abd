"""Bake LoRAs into a transformer for good, and save a merged model folder.

`merge_into_base` changes the live weights permanently (the patcher is restored first).
`save_merged_model` leaves the live model alone: it streams the SOURCE folder's transformer weights (full precision as stored, whatever the memory mode did to
the live copy), adds the LoRA deltas in float32 and writes them in the source's own format and
dtype, one tensor at a time (peak memory: one tensor). Everything else in the folder is hardlinked
(copied where links are impossible). The folder appears under its final name only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..fileio import atomic_folder, confined_path
from .cancel import check_cancel
from .keymap import is_original_state_dict, original_to_diffusers
from .lora_patch import Term, Workspace, merged_weight_, stack_terms

Progress = Callable[[int, int], None]

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
PROVENANCE_FILE = "merged_loras.json"


def merge_into_base(transformer: nn.Module, loras: Iterable, patcher=None, progress: Progress | None = None) -> int:
    """Permanently add the stack to the transformer's weights (float32 math, cast back to each
    weight's dtype). Pass the pipe's patcher so that whatever it has patched is restored first
    (it holds no backups afterwards, so nothing stale survives). Returns the number of weights changed."""
    if patcher is not None:
        patcher.restore(transformer)
    terms = stack_terms(loras)
    workspace = Workspace()
    with torch.no_grad():
        for i, (path, module_terms) in enumerate(terms.items()):
            check_cancel()
            weight = transformer.get_submodule(path).weight.data
            merged_weight_(weight, weight, module_terms, workspace=workspace)  # row chunks: each chunk is read before written
            if progress is not None:
                progress(i + 1, len(terms))
    return len(terms)


# ----------------------------------------------------------------------------------------------
# streaming safetensors writer


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors_streaming(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                                produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are produced one at a time by `produce(name)`
    (each must have the dtype and shape announced in `specs`)."""
    header: dict = {}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, announced {dtype} {shape}")
            f.write(_tensor_bytes(tensor))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# merged model folder


def _link_or_copy(src: Path, dst: Path) -> None:
    real = Path(os.path.realpath(src))
    try:
        os.link(real, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(real, dst)


def _replicate_tree(src: Path, dst: Path, skip: set[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_dir():
            _replicate_tree(entry, target, set())
        elif entry.is_file():
            _link_or_copy(entry, target)


def _merge_weight_file(src: Path, dst: Path, terms: dict[str, list[Term]], used: set[str],
                       progress: Callable[[], None]) -> None:
    from safetensors import safe_open

    workspace = Workspace()
    with safe_open(str(src), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        original = is_original_state_dict(keys)
        specs = []
        for key in keys:
            sl = f.get_slice(key)
            dtype = {v: k for k, v in _ST_DTYPES.items()}.get(sl.get_dtype())
            if dtype is None:
                raise ValueError(f"{src}: tensor {key} has dtype {sl.get_dtype()}, which cannot be merged")
            specs.append((key, dtype, tuple(sl.get_shape())))

        def produce(key: str) -> torch.Tensor:
            check_cancel()  # between tensors: Cancel stops a long save (the partial folder is removed)
            tensor = f.get_tensor(key)
            if not key.endswith(".weight"):
                return tensor
            module_path = key[: -len(".weight")]
            if original:
                module_path = original_to_diffusers(module_path)
            module_terms = terms.get(module_path)
            if module_terms is None:
                return tensor
            if tensor.ndim != 2 or tensor.shape != (module_terms[0][0].out_features, module_terms[0][0].in_features):
                raise ValueError(f"{src}: {key} has shape {tuple(tensor.shape)}, which the LoRA does not fit")
            merged = torch.empty_like(tensor)
            merged_weight_(merged, tensor, module_terms, workspace=workspace)
            used.add(module_path)
            progress()
            return merged

        write_safetensors_streaming(dst, specs, produce, metadata=f.metadata())


def save_merged_model(pipe, loras: Iterable, dest_folder: str | os.PathLike,
                      progress: Progress | None = None) -> Path:
    """Write a complete, loadable model folder at `dest_folder`: the pipe's source folder with
    the LoRA stack baked into its transformer weights. Fails if `dest_folder` exists."""
    loras = tuple(loras)
    src = Path(pipe.folder)
    dest = Path(dest_folder)
    src_transformer = src / "transformer"
    weight_files = sorted(p for p in src_transformer.glob("*.safetensors")) if src_transformer.is_dir() else []
    if not weight_files:
        raise FileNotFoundError(f"cannot save a merged model: {src_transformer} has no .safetensors weights to merge into")
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; choose another name")
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise ValueError(f"cannot save a merged model inside its source folder {src}")
    terms = stack_terms(loras)
    with atomic_folder(dest) as partial:  # a unique temporary folder, renamed onto dest once complete
        _replicate_tree(src, partial, skip={"transformer", PROVENANCE_FILE})
        out_transformer = partial / "transformer"
        out_transformer.mkdir()
        for entry in sorted(src_transformer.iterdir()):
            if entry.is_file() and entry.suffix != ".safetensors":
                shutil.copy2(os.path.realpath(entry), out_transformer / entry.name)
            elif entry.is_dir():
                _replicate_tree(entry, out_transformer / entry.name, set())
        used: set[str] = set()
        done = [0]

        def step() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(terms))

        for file in weight_files:
            _merge_weight_file(file, out_transformer / file.name, terms, used, step)
        missing = sorted(set(terms) - used)
        if missing:
            raise ValueError(f"the source checkpoint in {src_transformer} has no weights for {len(missing)} LoRA "
                             f"targets (e.g. {', '.join(missing[:3])}); it does not match the loaded model")
        provenance = {
            "source_folder": str(src),
            "loras": [{"name": a.name, "strength": float(a.strength), "source": getattr(a.weights, "source", "")}
                      for a in loras],
        }
        (partial / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2), encoding="utf-8")
    return dest


def merged_model_destination(root: str | os.PathLike, name: str) -> Path:
    """The new folder `name` directly inside `root`, for a user-typed name (see fileio.confined_path);
    an existing folder is refused."""
    dest = confined_path(root, name, what="model name", plain_name=True)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; choose another name")
    return dest
