"""Prompt encoding for both EasyAnimate generations.

V5: Bert (77 tokens, last hidden state) + T5 (256 tokens, last hidden state); the transformer
projects each with its own text_proj / text_proj_t5 and concatenates them.
V5.1: Qwen2-VL on the chat-formatted prompt (256 tokens), the second-to-last hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import EasyAnimatePipe

BERT_MAX_TOKENS, T5_MAX_TOKENS, QWEN_MAX_TOKENS = 77, 256, 256


@dataclass
class TextConditioning:
    """Encoder outputs for a batch of prompts, ready for the transformer (on any device)."""

    embeds: torch.Tensor
    embeds_t5: torch.Tensor | None = None

    def to(self, device, dtype) -> "TextConditioning":
        t5 = None if self.embeds_t5 is None else self.embeds_t5.to(device, dtype)
        return TextConditioning(self.embeds.to(device, dtype), t5)

    @staticmethod
    def cat(parts: list["TextConditioning"]) -> "TextConditioning":
        t5 = None if parts[0].embeds_t5 is None else torch.cat([p.embeds_t5 for p in parts])
        return TextConditioning(torch.cat([p.embeds for p in parts]), t5)

    def __len__(self) -> int:
        return self.embeds.shape[0]


def _tokens(tokenizer, texts, max_length, device):
    batch = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                      return_attention_mask=True, return_tensors="pt")
    return batch.input_ids.to(device), batch.attention_mask.to(device)


@torch.no_grad()
def encode_prompts(pipe: EasyAnimatePipe, prompts: list[str]) -> TextConditioning:
    """Encode prompts with the pipe's text encoders; encoders are on the GPU only while encoding."""
    if not prompts:
        raise ValueError("no prompts to encode")
    device = pipe.compute_device
    if pipe.version == "v5":
        with pipe.placement.use(pipe.text_encoder):
            ids, mask = _tokens(pipe.tokenizer, prompts, BERT_MAX_TOKENS, device)
            embeds = pipe.text_encoder(input_ids=ids, attention_mask=mask)[0]
        with pipe.placement.use(pipe.text_encoder_2):
            ids, mask = _tokens(pipe.tokenizer_2, prompts, T5_MAX_TOKENS, device)
            embeds_t5 = pipe.text_encoder_2(input_ids=ids, attention_mask=mask)[0]
        return TextConditioning(embeds.to(pipe.dtype), embeds_t5.to(pipe.dtype))
    texts = [
        pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": p}]}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    with pipe.placement.use(pipe.text_encoder):
        ids, mask = _tokens(pipe.tokenizer, texts, QWEN_MAX_TOKENS, device)
        out = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        embeds = out.hidden_states[-2]
    return TextConditioning(embeds.to(pipe.dtype))
