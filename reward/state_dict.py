"""Reading reward checkpoints as plain state dicts, without ever executing pickled code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def unwrap_state_dict(obj: Any, source: str) -> dict[str, Any]:
    """{"state_dict": {...}} or a bare dict -> the dict, with DataParallel's "module." prefix stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    return {(key[len("module.") :] if key.startswith("module.") else key): value for key, value in obj.items()}


def read_state_dict(path: str | os.PathLike, what: str = "the reward model's weights") -> dict[str, Any]:
    """A .safetensors file, or a torch file of tensors only (`weights_only=True`), as a flat state dict.

    A file that needs real unpickling (a whole pickled module) raises `pickle.UnpicklingError`
    from torch.load; callers add the advice that fits them. A truncated, empty or garbage file
    raises ValueError naming the file and `what` belongs there.
    """
    import pickle

    from ..easyanimate.folder_files import check_weight_file

    path = os.fspath(path)
    check_weight_file(Path(path), what)  # empty / truncated / not an archive: named here
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return unwrap_state_dict(load_file(path, device="cpu"), path)
        return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(path):
            raise
        raise ValueError(f"cannot read {path}: {e}; it should hold {what}: the file is corrupt or incomplete, "
                         "download it again") from e
