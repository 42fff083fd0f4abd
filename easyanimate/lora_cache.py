"""Parsed LoRA files kept in memory: the same file for the same transformer is read once.

Keyed by (real path, mtime, size, transformer config): a strength change re-runs a node (or a
script's loop) but re-reads nothing, and a file replaced under the same name is read again. A few
entries only: a 12b LoRA is ~1.8 GB. Plain Python (the ComfyUI nodes, the CLI and scripts share
`LORA_CACHE`); no ComfyUI imports.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch

from .lora_format import LoraWeights, load_lora_file

DEFAULT_SIZE = 3


def _config_key(transformer) -> tuple:
    config = getattr(transformer, "config", None) or {}
    return tuple(sorted((k, repr(v)) for k, v in dict(config).items()))


class LoraCache:
    def __init__(self, size: int = DEFAULT_SIZE):
        self.size = size
        self.reads = 0  # files actually parsed
        self._entries: OrderedDict[tuple, LoraWeights] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike, transformer) -> LoraWeights:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, _config_key(transformer))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        # Outside inference mode (ComfyUI runs nodes inside it): a trainer may later backpropagate
        # through these adapters.
        with torch.inference_mode(False):
            weights = load_lora_file(path, transformer)
        with self._lock:
            self.reads += 1
            self._entries[key] = weights
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return weights

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


LORA_CACHE = LoraCache()


def cached_lora(path: str | os.PathLike, transformer) -> LoraWeights:
    """load_lora_file through the shared cache."""
    return LORA_CACHE.get(path, transformer)
