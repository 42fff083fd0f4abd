"""CLIP text tokenisation that works offline.

Every CLIP-family reward here uses the same OpenAI CLIP BPE (49408 tokens, <|startoftext|> = 49406,
<|endoftext|> = 49407, 77-token context). A model folder may ship its own tokenizer files
(vocab.json + merges.txt, or tokenizer.json); when it does not, we fall back to open_clip's
`SimpleTokenizer`, which reads the BPE merges from the `bpe_simple_vocab_16e6.txt.gz` file that
open-clip-torch ships, so nothing is downloaded. It pads with id 0 ("!"), as open_clip and the LAION
CLIP-H tokenizer (used by PickScore and MPS) do.

Padding never changes a CLIP text embedding that is pooled at the end-of-text token, because the text
tower is causal; it does matter for MPS, which attends over all 77 token features (see mps.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..fileio import write_text_atomic

log = logging.getLogger(__name__)

CLIP_CONTEXT_LENGTH = 77
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


class ClipTokenizer:
    """prompts -> LongTensor (B, 77): start token, BPE ids, end token, padding; truncated to fit."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], source: str):
        self._encode = encode
        self.source = source  # human-readable: where the vocabulary came from

    def __call__(self, prompts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self._encode(list(prompts))
        if ids.ndim != 2 or ids.shape[1] != CLIP_CONTEXT_LENGTH:
            raise RuntimeError(f"tokenizer from {self.source} returned shape {tuple(ids.shape)}, expected (B, 77)")
        return ids.long()

    def __repr__(self) -> str:
        return f"ClipTokenizer(source={self.source!r})"


def open_clip_tokenizer() -> ClipTokenizer:
    """The OpenAI CLIP BPE from open-clip-torch's bundled vocabulary file (no network)."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer(context_length=CLIP_CONTEXT_LENGTH)
    return ClipTokenizer(lambda prompts: simple(prompts, context_length=CLIP_CONTEXT_LENGTH), "open_clip bpe_simple_vocab_16e6")


def folder_has_tokenizer(folder: str | os.PathLike) -> bool:
    return any(all(os.path.isfile(os.path.join(folder, f)) for f in files) for files in TOKENIZER_FILE_SETS)


def hf_folder_tokenizer(folder: str | os.PathLike) -> ClipTokenizer:
    """transformers' CLIP tokenizer from local files only (never remote code, never the network)."""
    from transformers import AutoTokenizer

    from ..easyanimate.folder_files import check_folder_files

    check_folder_files(Path(folder), "CLIP tokenizer files (tokenizer.json or vocab.json + merges.txt)", weights=False)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # tokenizers raises its own types for garbage files
        raise ValueError(f"cannot load the CLIP tokenizer in {folder}: {e}") from e

    def encode(prompts: list[str]) -> torch.Tensor:
        out = tok(prompts, padding="max_length", max_length=CLIP_CONTEXT_LENGTH, truncation=True, return_tensors="pt")
        return out["input_ids"]

    return ClipTokenizer(encode, f"tokenizer files in {folder}")


def tokenizer_for_folder(folder: str | os.PathLike) -> ClipTokenizer:
    """The folder's own tokenizer if it ships one, else the bundled open_clip BPE (logged)."""
    if folder_has_tokenizer(folder):
        return hf_folder_tokenizer(folder)
    log.info(
        "%s has no tokenizer files (tokenizer.json or vocab.json + merges.txt); using the CLIP BPE "
        "vocabulary bundled with open-clip-torch (identical ids for CLIP models)", folder
    )
    return open_clip_tokenizer()


def write_clip_tokenizer_files(folder: str | os.PathLike, pad_token: str = "!") -> str:
    """Write vocab.json + merges.txt + tokenizer_config.json for transformers' CLIPTokenizer.

    Built from open-clip-torch's bundled BPE (no network), so a model folder can carry its own
    tokenizer. `pad_token` "!" (id 0) is what LAION's CLIP-H tokenizer and open_clip pad with. Quirk
    shared with LAION's tokenizer files: a "!" typed in a prompt then becomes the special pad token
    (id 0) instead of the BPE word-end "!</w>" (id 256) that open_clip produces.
    """
    import json

    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    vocab = dict(simple.encoder)
    # open_clip names its special tokens differently; transformers expects OpenAI's spelling.
    for token_id, name in ((simple.sot_token_id, "<|startoftext|>"), (simple.eot_token_id, "<|endoftext|>")):
        for key in [k for k, v in vocab.items() if v == token_id]:
            del vocab[key]
        vocab[name] = token_id
    merges = sorted(simple.bpe_ranks.items(), key=lambda item: item[1])
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n",
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": CLIP_CONTEXT_LENGTH,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": pad_token,
            }
        ),
    }
    for name, text in files.items():
        write_text_atomic(os.path.join(folder, name), text)
    return os.fspath(folder)
