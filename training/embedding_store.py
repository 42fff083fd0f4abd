"""Where the trainer keeps the text embeddings of its prompts.

A few hundred prompts fit in RAM (Qwen2-VL: 1.8 MB per prompt in bf16); a large prompt file does
not need to: above `ram_limit` prompts the embeddings are written, chunk by chunk as they are
encoded, to safetensors files in a private temporary folder, and each training step reads back
only its batch's rows. The folder is the pack's own and is deleted when the store is closed (or
collected).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from ..easyanimate.text import TextConditioning

DEFAULT_RAM_LIMIT = 256  # prompts kept in RAM; more spill to disk


class EmbeddingStore:
    def __init__(self, expected: int, ram_limit: int = DEFAULT_RAM_LIMIT):
        self.on_disk = expected > ram_limit
        self._ram: dict[str, TextConditioning] = {}
        self._where: dict[str, tuple[int, int]] = {}  # prompt -> (chunk file index, row)
        self._folder: Path | None = None
        if self.on_disk:
            self._folder = Path(tempfile.mkdtemp(prefix="easyanimate-prompt-embeddings-"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._folder), True)

    @property
    def folder(self) -> Path | None:
        return self._folder

    def add_chunk(self, prompts: list[str], encoded: TextConditioning) -> None:
        if not self.on_disk:
            for i, prompt in enumerate(prompts):
                t5 = None if encoded.embeds_t5 is None else encoded.embeds_t5[i:i + 1].cpu()
                self._ram[prompt] = TextConditioning(encoded.embeds[i:i + 1].cpu(), t5)
            return
        from safetensors.torch import save_file

        index = len({c for c, _ in self._where.values()})
        tensors = {"embeds": encoded.embeds.detach().cpu().contiguous()}
        if encoded.embeds_t5 is not None:
            tensors["embeds_t5"] = encoded.embeds_t5.detach().cpu().contiguous()
        save_file(tensors, str(self._folder / f"chunk{index:06d}.safetensors"))
        for row, prompt in enumerate(prompts):
            self._where[prompt] = (index, row)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._ram or prompt in self._where

    def __len__(self) -> int:
        return len(self._ram) + len(self._where)

    def get(self, prompt: str) -> TextConditioning:
        if not self.on_disk:
            return self._ram[prompt]
        from safetensors import safe_open

        index, row = self._where[prompt]
        with safe_open(str(self._folder / f"chunk{index:06d}.safetensors"), framework="pt", device="cpu") as f:
            embeds = f.get_slice("embeds")[row:row + 1]
            t5 = f.get_slice("embeds_t5")[row:row + 1] if "embeds_t5" in f.keys() else None
        return TextConditioning(embeds, t5)

    def resident_bytes(self) -> int:
        """Bytes of embeddings held in RAM (0 when they are on disk)."""
        total = 0
        for cond in self._ram.values():
            total += cond.embeds.numel() * cond.embeds.element_size()
            if cond.embeds_t5 is not None:
                total += cond.embeds_t5.numel() * cond.embeds_t5.element_size()
        return total

    def close(self) -> None:
        if self._folder is not None:
            self._finalizer()
