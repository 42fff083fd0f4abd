"""Prompt encoding for both EasyAnimate generations.

V5: Bert + T5, last hidden state of each; the transformer projects each with its own text_proj /
text_proj_t5 and concatenates them. As in EasyAnimate's pipeline_easyanimate_inpaint.py
encode_prompt: each tokenizer pads to min(tokenizer.model_max_length, 256) tokens, and the encoders
get the attention mask only when the transformer config enables it (the official V5 yaml sets
enable_text_attention_mask false: Bert and T5 then also attend to the padding).
V5.1: Qwen2-VL on the chat-formatted prompt (256 tokens, padded on the right), the second-to-last
hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import EasyAnimatePipe

# V5 caps both tokenizers at this many tokens (EasyAnimate's `actual_max_sequence_length`).
V5_MAX_TOKENS, QWEN_MAX_TOKENS = 256, 256


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


def _tokens(tokenizer, texts, max_length, device, padding_side=None):
    extra = {} if padding_side is None else {"padding_side": padding_side}
    batch = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                      return_attention_mask=True, return_tensors="pt", **extra)
    return batch.input_ids.to(device), batch.attention_mask.to(device)


def v5_max_tokens(tokenizer) -> int:
    return min(int(tokenizer.model_max_length), V5_MAX_TOKENS)


def _encode_v5(placement, encoder, tokenizer, prompts, device, use_mask: bool) -> torch.Tensor:
    with placement.use(encoder):
        ids, mask = _tokens(tokenizer, prompts, v5_max_tokens(tokenizer), device)
        return encoder(input_ids=ids, attention_mask=mask if use_mask else None)[0]


@torch.no_grad()
def encode_prompts(pipe: EasyAnimatePipe, prompts: list[str]) -> TextConditioning:
    """Encode prompts with the pipe's text encoders; encoders are on the GPU only while encoding."""
    if not prompts:
        raise ValueError("no prompts to encode")
    device = pipe.compute_device
    if pipe.version == "v5":
        use_mask = bool(getattr(pipe.transformer.config, "enable_text_attention_mask", True))
        embeds = _encode_v5(pipe.placement, pipe.text_encoder, pipe.tokenizer, prompts, device, use_mask)
        embeds_t5 = _encode_v5(pipe.placement, pipe.text_encoder_2, pipe.tokenizer_2, prompts, device, use_mask)
        return TextConditioning(embeds.to(pipe.dtype), embeds_t5.to(pipe.dtype))
    texts = [
        pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": p}]}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    with pipe.placement.use(pipe.text_encoder):
        # Right padding, whatever the tokenizer folder's config says (Qwen2-VL tokenizers may default to
        # left): diffusers' and EasyAnimate's own pipelines pass padding_side="right" explicitly.
        ids, mask = _tokens(pipe.tokenizer, texts, QWEN_MAX_TOKENS, device, padding_side="right")
        out = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        embeds = out.hidden_states[-2]
    return TextConditioning(embeds.to(pipe.dtype))
