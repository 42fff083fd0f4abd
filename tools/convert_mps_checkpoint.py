"""Convert an MPS checkpoint into a safetensors state dict the pack loads without pickle.

The original MPS release (Kwai-Kolors/MPS, `MPS_overall_checkpoint.pth`) is a PICKLED WHOLE MODULE:
loading it runs arbitrary code from the file, so the pack never does that on its own. This tool is
the one explicit place where it can happen, and only with `--trust-pickle` (a warning is printed).
Unpickling needs the MPS source classes importable (`trainer.models.clip_model`): pass the folder
of a Kwai-Kolors/MPS checkout with `--mps-repo`.

EasyAnimate's re-hosted `MPS_overall.pth` is already a plain state dict (keys `model.*`,
`cross_model.*`): it loads with `weights_only=True`, needs no flag, and the reward loader reads it
directly; converting it is optional (safetensors loads faster and can be memory-mapped).

Usage:
    python -m easyanimate_reward.tools.convert_mps_checkpoint SRC.pth DST.safetensors \
        [--trust-pickle --mps-repo /path/to/MPS] [--dtype fp16|bf16|fp32]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings

import torch

from ..easyanimate.precision import PRECISIONS
from ..fileio import save_safetensors_atomic
from ..reward.state_dict import read_state_dict, unwrap_state_dict

DTYPES = PRECISIONS


def _load_plain(src: str) -> dict:
    try:
        return read_state_dict(src)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{src} cannot be loaded as plain tensors (weights_only=True failed: {err}). If this is the "
            f"original pickled MPS checkpoint and you trust its origin, re-run with --trust-pickle "
            f"(and --mps-repo pointing at a Kwai-Kolors/MPS checkout)"
        ) from err


def _load_pickled(src: str, mps_repo: str | None):
    warnings.warn(
        f"--trust-pickle: unpickling {src} with weights_only=False executes code stored in the file; "
        f"only do this for a file from a source you trust",
        stacklevel=2,
    )
    if mps_repo:
        sys.path.insert(0, os.path.abspath(mps_repo))
    try:
        return torch.load(src, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"unpickling {src} needs the MPS source classes ({err.name}); pass --mps-repo /path/to/MPS checkout"
        ) from err


def extract_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A module, {"state_dict": ...}, or a state dict -> flat {name: tensor}, "module." stripped."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    state = {key: value for key, value in unwrap_state_dict(obj, source).items() if isinstance(value, torch.Tensor)}
    if not any(k.startswith("model.") for k in state) or not any(k.startswith("cross_model.") for k in state):
        raise ValueError(f"{source}: no model.* / cross_model.* tensors found: not an MPS checkpoint")
    return state


def convert_mps_checkpoint(
    src: str,
    dst: str,
    trust_pickle: bool = False,
    mps_repo: str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    if not os.path.isfile(src):
        raise FileNotFoundError(f"MPS checkpoint not found: {src}")
    if not dst.endswith(".safetensors"):
        raise ValueError(f"destination must end with .safetensors: {dst}")
    obj = _load_pickled(src, mps_repo) if trust_pickle else _load_plain(src)
    state = extract_state_dict(obj, src)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    # safetensors refuses shared / strided storage: give every tensor its own contiguous copy.
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_safetensors_atomic(dst, state, {"format": "pt", "model": "MPS overall", "source": os.path.basename(src)})
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="MPS checkpoint (.pth): EasyAnimate's state dict, or the original pickled module")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--trust-pickle", action="store_true", help="allow unpickling (runs code from the file)")
    parser.add_argument("--mps-repo", default=None, help="Kwai-Kolors/MPS checkout, needed to unpickle the original")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    args = parser.parse_args(argv)
    out = convert_mps_checkpoint(args.src, args.dst, args.trust_pickle, args.mps_repo, DTYPES.get(args.dtype))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
