"""Prompt lists for training: a multiline string, a .txt file (one prompt a line) or a .jsonl file
(one JSON object a line with a "prompt" key, as MovieGenBench-style files are)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..fileio import confined_path

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")


class NoPromptsError(ValueError):
    """The prompt source holds no prompt at all."""


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not JSON: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path} line {number} has no string "prompt" key')
            prompts.append(record["prompt"].strip())
        return _checked([p for p in prompts if p], str(path))
    if path.suffix.lower() != ".txt":
        raise ValueError(f"{path}: prompt files are .txt (one prompt a line) or .jsonl (key \"prompt\")")
    return _checked(split_prompt_lines(text), str(path))


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
        name = text.strip()
        if confine:
            candidates = [confined_path(d, name, what=f"{what}: prompt file") for d in search_dirs]
        elif os.path.isabs(name):
            candidates = [Path(name)]
        else:
            candidates = [Path(d) / name for d in search_dirs] + [Path(name)]
        for candidate in candidates:
            if candidate.is_file():
                return read_prompt_file(candidate)
        where = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(f"{what}: prompt file {name!r} not found (looked at {where})")
    prompts = split_prompt_lines(text)
    if allow_empty:
        return prompts
    return _checked(prompts, what)


def _checked(prompts: list[str], where: str) -> list[str]:
    if not prompts:
        raise NoPromptsError(f"{where}: no prompts found. Give one prompt per line (a .txt file or text), "
                             'or a .jsonl file with a "prompt" key on each line.')
    return prompts
