"""Prompt lists for training: a multiline string, a .txt file (one prompt a line) or a .jsonl file
(one JSON object a line with a "prompt" key, as MovieGenBench-style files are).

Training prompts may start their video from an image (image-to-video rollouts on InP models): a
line `start.png | A cat walks in` or a .jsonl line {"prompt": ..., "image": "start.png"}. Image
names are looked up in ComfyUI's input folder on the node (confined to it) and beside the prompt
file on the CLI."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..fileio import confined_path

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_SEPARATOR = "|"


@dataclass(frozen=True)
class TrainingPrompt:
    text: str
    image: Path | None = None  # the start image of an image-to-video rollout


def split_image_prefix(line: str) -> tuple[str | None, str]:
    """'start.png | a cat' -> ('start.png', 'a cat'); a line without an image name before '|' is
    all prompt (a '|' inside a prompt stays)."""
    head, sep, tail = line.partition(IMAGE_SEPARATOR)
    if sep and head.strip().lower().endswith(IMAGE_SUFFIXES) and tail.strip():
        return head.strip(), tail.strip()
    return None, line.strip()


def _raw_records(path: Path) -> list[tuple[str | None, str]]:
    """(image name or None, prompt) of every prompt of a .txt / .jsonl file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not JSON: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path} line {number} has no string "prompt" key')
            image = record.get("image")
            if image is not None and not isinstance(image, str):
                raise ValueError(f'{path} line {number}: "image" must be a file name')
            if record["prompt"].strip():
                records.append((image, record["prompt"].strip()))
        return records
    if path.suffix.lower() != ".txt":
        raise ValueError(f"{path}: prompt files are .txt (one prompt a line) or .jsonl (key \"prompt\")")
    return [split_image_prefix(line) for line in split_prompt_lines(text)]


def _resolve_images(records, image_dirs: Sequence[str | os.PathLike], confine: bool, where: str) -> list[TrainingPrompt]:
    out = []
    for image, text in records:
        if image is None:
            out.append(TrainingPrompt(text))
            continue
        if confine:
            candidates = [confined_path(d, image, what=f"{where}: start image") for d in image_dirs]
        else:
            candidates = [Path(image)] if os.path.isabs(image) else [Path(d) / image for d in image_dirs]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            looked = ", ".join(str(c) for c in candidates)
            raise FileNotFoundError(f"{where}: start image {image!r} of prompt {text[:60]!r} not found (looked at "
                                    f"{looked}); put it in ComfyUI's input folder (node) or beside the prompt file (CLI)")
        out.append(TrainingPrompt(text, found))
    return out


def read_prompt_items(path: str | os.PathLike, image_dirs: Sequence[str | os.PathLike] | None = None,
                      confine: bool = False) -> list[TrainingPrompt]:
    """Training prompts of a file, with their start images (looked up in `image_dirs`, by default
    the file's own folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records = _raw_records(path)
    if not records:
        _checked([], str(path))
    return _resolve_images(records, image_dirs if image_dirs is not None else [path.parent], confine, str(path))


def load_prompt_items(source: str, search_dirs: Sequence[str | os.PathLike], what: str = "training prompts",
                      confine: bool = True) -> list[TrainingPrompt]:
    """The node's training prompts: lines (each may name a start image) or a prompt file in
    `search_dirs`; images from `search_dirs` too."""
    text = str(source)
    if looks_like_prompt_file(text):
        return read_prompt_items(find_prompt_file(text.strip(), search_dirs, what, confine), search_dirs, confine)
    records = [split_image_prefix(line) for line in split_prompt_lines(text)]
    if not records:
        _checked([], what)
    return _resolve_images(records, search_dirs, confine, what)


def load_start_image(path: Path) -> torch.Tensor:
    """An image file -> (1, 3, H, W) float32 in [0, 1]; a file that is not an image is named."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"start image {path} cannot be read as an image ({e})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


class NoPromptsError(ValueError):
    """The prompt source holds no prompt at all."""


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a file, text only (held-out and validation prompts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    return _checked([text for _, text in _raw_records(path)], str(path))


def split_prompt_lines(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def looks_like_prompt_file(text: str) -> bool:
    stripped = text.strip()
    return "\n" not in stripped and stripped.lower().endswith(PROMPT_FILE_SUFFIXES)


def load_prompts(source: str | os.PathLike, search_dirs: Iterable[str | os.PathLike] = (),
                 what: str = "training prompts", allow_empty: bool = False, confine: bool = False) -> list[str]:
    """Prompts from a file path, a file name found in `search_dirs`, or the lines of a string.

    confine: the name comes from a workflow, so it may only name a file inside `search_dirs`
    (no absolute paths, no '..' escapes); the CLI reads any path its user gives."""
    if isinstance(source, os.PathLike):
        return read_prompt_file(source)
    text = str(source)
    if looks_like_prompt_file(text):
        return read_prompt_file(find_prompt_file(text.strip(), search_dirs, what, confine))
    prompts = split_prompt_lines(text)
    if allow_empty:
        return prompts
    return _checked(prompts, what)


def find_prompt_file(name: str, search_dirs: Iterable[str | os.PathLike], what: str, confine: bool) -> Path:
    """The prompt file `name`: confined to `search_dirs` (a name from a workflow), else in them, as an
    absolute path or relative to the working folder (the CLI's user)."""
    if confine:
        candidates = [confined_path(d, name, what=f"{what}: prompt file") for d in search_dirs]
    elif os.path.isabs(name):
        candidates = [Path(name)]
    else:
        candidates = [Path(d) / name for d in search_dirs] + [Path(name)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{what}: prompt file {name!r} not found (looked at {where})")


def _checked(prompts: list[str], where: str) -> list[str]:
    if not prompts:
        raise NoPromptsError(f"{where}: no prompts found. Give one prompt per line (a .txt file or text), "
                             'or a .jsonl file with a "prompt" key on each line.')
    return prompts
