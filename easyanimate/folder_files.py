"""Checks on the files of a model folder before a library is handed the folder.

Used for the parts that transformers (text encoders, tokenizers) or a reward loader reads: every
file is checked for being readable (a truncated download, an empty file, an HTML error page saved
under the weights' name), shard indexes may only name files inside their own folder, and a text
encoder's config may not ask for more (layers, width) than its weight files hold, so a hostile
or mixed-up config.json never starts a huge allocation. Messages name the file and what belongs
there, like the transformer/VAE paths do.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Iterable

from ..fileio import confined_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_TEXT_FILES = ("vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                        "tokenizer.model")


class FolderFileError(ValueError):
    """A file in a model or reward folder is unreadable or unsafe. The message names it."""


def confined_shard(index: Path, name: object) -> Path:
    """A shard file named by `index` (a *.index.json weight_map value), inside the index's folder
    (fileio.confined_path, links included): absolute names, drive letters, `..` and links that lead
    out of the folder are refused."""
    try:
        return confined_path(index.parent, name, what=f"{index} names shard", links_inside=True)
    except ValueError as e:
        raise FolderFileError(f"{e}; the shard is outside its folder {index.parent}: shard files must sit beside "
                              "the index (plain names such as model-00001-of-00002.safetensors)") from e


def read_shard_index(index: Path, what: str) -> list[Path]:
    """The shard files of `index`, each confined to the index's folder and present."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FolderFileError(f"{index} is not a valid shard index ({what}): {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FolderFileError(f"{index} has no weight_map ({what}); it should map tensor names to shard files")
    shards = [confined_shard(index, name) for name in sorted(set(map(str, weight_map.values())))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise FolderFileError(f"{index} lists shards that are missing: {', '.join(missing)}")
    return shards


def check_shard_indexes(folder: Path, what: str) -> None:
    """Every *.index.json in `folder` names only shards inside it (before transformers reads them)."""
    for index in sorted(folder.glob("*.index.json")):
        read_shard_index(index, what)


def check_weight_file(path: Path, what: str) -> None:
    """Readable header: a .safetensors whose header covers the file, or a torch zip archive."""
    advice = f"it should hold {what}; the file is corrupt or incomplete: download it again"
    try:
        size = path.stat().st_size
    except OSError as e:
        raise FolderFileError(f"cannot read {path} ({what}): {e}") from e
    if size == 0:
        raise FolderFileError(f"{path} is empty; {advice}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                handle.keys()
        except Exception as e:  # SafetensorError and friends for truncated / garbage files
            raise FolderFileError(f"cannot read {path}: {e}; {advice}") from e
    elif path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise FolderFileError(f"cannot read {path}: {e}; {advice}") from e


def check_folder_files(folder: Path, what: str, weights: bool = True) -> None:
    """Every JSON file parses, tokenizer text files are not empty, weight files are readable and
    shard indexes stay in the folder. `what` says what belongs in the folder."""
    if not folder.is_dir():
        raise FolderFileError(f"missing folder {folder} ({what})")
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.name.endswith(".json"):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FolderFileError(f"{path} is not valid JSON ({what}): {e}; the file is corrupt or "
                                      "incomplete: download it again") from e
        elif path.name in TOKENIZER_TEXT_FILES and path.stat().st_size == 0:
            raise FolderFileError(f"{path} is empty ({what}); download it again")
        elif weights and path.suffix in WEIGHT_SUFFIXES:
            check_weight_file(path, what)
    check_shard_indexes(folder, what)


# ----------------------------------------------------------------------------------------------
# config sizes against the weight files


def _weight_files(folder: Path) -> list[Path]:
    for stem in ("model", "pytorch_model"):
        for suffix in (".safetensors", ".bin"):
            single = folder / f"{stem}{suffix}"
            if single.is_file():
                return [single]
            index = folder / f"{stem}{suffix}.index.json"
            if index.is_file():
                return read_shard_index(index, "text encoder weights")
    return []


def file_tensor_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} read from the headers only (safetensors) or a memory-mapped torch file."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        else:
            import torch

            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")})
    return shapes


def check_config_fits_weights(cls, folder: Path) -> None:
    """Build `cls` (a transformers model class) from folder/config.json on the meta device (no
    memory), and refuse when it would hold more parameters than the folder's weight files: a
    config that asks for 3000 layers or a huge width is found before any real allocation.

    Layer counts are checked first from the tensor names alone, so a hostile depth is refused
    without even building the meta model. Files may hold more than the model (a T5EncoderModel
    from a full T5 checkpoint, a BertModel from a pre-training checkpoint); one tied tensor (the
    output head sharing the embedding) may be absent from the file."""
    import torch
    from transformers import AutoConfig

    files = _weight_files(folder)
    if not files:
        return  # transformers names the missing weights itself
    shapes = file_tensor_shapes(files)
    config_path = folder / "config.json"
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    depth_in_file = max((int(m.group(1)) + 1 for k in shapes for m in re.finditer(r"\.(\d+)\.", k)), default=0)
    for section in [raw] + [v for v in raw.values() if isinstance(v, dict)]:
        for key in ("num_hidden_layers", "num_layers", "num_decoder_layers", "depth", "n_layer"):
            value = section.get(key)
            if isinstance(value, int) and value > depth_in_file:
                raise FolderFileError(
                    f"{config_path}: {key} = {value} but the weights in {folder} hold at most {depth_in_file} "
                    "layers; the config does not belong to these weights")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise FolderFileError(f"{config_path}: not a usable {cls.__name__} config: {e}") from e
    with torch.device("meta"):
        model = cls._from_config(config)
    sizes = [p.numel() for p in model.parameters()]
    model_total, biggest = sum(sizes), max(sizes, default=0)
    file_total = sum(int(torch.Size(s).numel()) for s in shapes.values())
    if model_total > file_total + biggest:
        raise FolderFileError(
            f"{config_path} describes a {cls.__name__} of {model_total / 1e6:.1f}M parameters but the weight files "
            f"hold {file_total / 1e6:.1f}M; the config does not belong to these weights (check hidden sizes and "
            "layer counts)")
