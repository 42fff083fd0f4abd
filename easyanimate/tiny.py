"""Tiny randomly initialised EasyAnimate model folders, in the real on-disk layouts.

Used by the tests and by the demo job (no weights can be downloaded). Everything is built from the
same classes the real checkpoints use: diffusers' EasyAnimateTransformer3DModel and
AutoencoderKLMagvit, transformers' Bert / T5 / Qwen2-VL, and tokenizers trained here on a few
sentences. A folder is a few MB and takes a few seconds of CPU.

    python -m easyanimate_reward.easyanimate.tiny DEST_FOLDER [--version v5|v5.1] [--kind inpaint|t2v|control|camera]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..fileio import atomic_folder

# Widths of the tiny models. The text widths keep the published models' relations at 1/64 scale:
# V5 projects Bert (1024) and T5 (2048) hidden states, V5.1 Qwen2-VL-7B's (3584). So every text
# width differs (a swapped encoder fails), and a V5.1 LoRA's text_proj (input 56) does not fit tiny
# V5's (input 16) and the reverse: the wrong-version refusal shows on the tiny models as on the real.
TINY_HEADS, TINY_HEAD_DIM = 2, 16
BERT_WIDTH, T5_WIDTH, QWEN_WIDTH = 16, 32, 56
QWEN_HEADS = 2  # head dim 28; the multimodal rope sections cover half of it: 4 + 5 + 5 = 14

_CORPUS = [
    "a cat playing piano in a sunny room",
    "a dog running on the beach at sunset",
    "a red car driving through a city at night",
    "waves crashing on rocks, cinematic, high quality",
    "a timelapse of clouds over snowy mountains",
    "an astronaut riding a horse on the moon",
    "close up of a flower blooming, macro photography",
    "a busy street market with colourful lanterns",
    "一只猫在弹钢琴",
    "blurry, low quality, distorted, watermark, text",
]


def _tiny_transformer_config(text_dim: int, text_dim_t5: int | None, in_channels: int = 33) -> dict:
    return dict(
        num_attention_heads=TINY_HEADS,
        attention_head_dim=TINY_HEAD_DIM,
        in_channels=in_channels,  # 33 = 16 noisy latents + 1 mask + 16 masked-video latents (InP); see KINDS
        out_channels=16,
        patch_size=2,
        num_layers=2,
        mmdit_layers=2,
        time_embed_dim=32,
        text_embed_dim=text_dim,
        text_embed_dim_t5=text_dim_t5,
        sample_width=16,
        sample_height=16,
    )


def build_tiny_transformer(version: str = "v5", seed: int = 0, kind: str = "inpaint"):
    from diffusers import EasyAnimateTransformer3DModel

    from .conditioning import PUBLISHED_IN_CHANNELS

    if (version, kind) not in PUBLISHED_IN_CHANNELS:
        raise ValueError(f"no published EasyAnimate {version} {kind} model to imitate; "
                         f"known: {sorted(PUBLISHED_IN_CHANNELS)}")
    in_channels = PUBLISHED_IN_CHANNELS[(version, kind)]
    torch.manual_seed(seed)
    if version == "v5":
        cfg = _tiny_transformer_config(BERT_WIDTH, T5_WIDTH, in_channels)
    else:
        cfg = _tiny_transformer_config(QWEN_WIDTH, None, in_channels)
    model = EasyAnimateTransformer3DModel(**cfg)
    # Random init leaves the zero-initialised output layers at zero; give every weight some signal
    # so that LoRA and sampling tests see real differences.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def build_tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLMagvit

    torch.manual_seed(seed)
    return AutoencoderKLMagvit(
        block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4, latent_channels=16
    )


def _write_bert(dest: Path, seed: int) -> None:
    from transformers import BertConfig, BertModel, BertTokenizer

    words = sorted({w for line in _CORPUS for w in line.replace(",", " ,").split()})
    chars = sorted({c for line in _CORPUS for c in line if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [c for c in chars if c not in words]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tok = BertTokenizer(str(vocab_file), model_max_length=77)
        tok.save_pretrained(dest / "tokenizer")
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=BERT_WIDTH, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(dest / "text_encoder", safe_serialization=True)


def _write_t5(dest: Path, seed: int) -> None:
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(_CORPUS * 4), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "spiece"), vocab_size=90, hard_vocab_limit=False,
            model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            character_coverage=1.0, minloglevel=2,
        )
        # Real mT5 tokenizer folders ship spiece.model; keep it beside the converted tokenizer.json.
        tok = T5Tokenizer.from_pretrained(tmp, extra_ids=0, model_max_length=256)
        tok.save_pretrained(dest / "tokenizer_2")
        shutil.copy(Path(tmp) / "spiece.model", dest / "tokenizer_2" / "spiece.model")
    torch.manual_seed(seed + 1)
    cfg = T5Config(
        vocab_size=len(tok), d_model=T5_WIDTH, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )
    T5EncoderModel(cfg).save_pretrained(dest / "text_encoder_2", safe_serialization=True)


_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_qwen2vl(dest: Path, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS * 4 + ["user assistant system"], trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=256, additional_special_tokens=specials[1:],
    )
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    tok.save_pretrained(dest / "tokenizer")

    torch.manual_seed(seed + 2)
    vocab = len(tok)
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=QWEN_WIDTH, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=QWEN_HEADS, num_key_value_heads=1, max_position_embeddings=512,
            rope_scaling={"type": "mrope", "mrope_section": [4, 5, 5]},
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=QWEN_WIDTH, num_heads=2, mlp_ratio=2,
                           in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        vocab_size=vocab,
        hidden_size=QWEN_WIDTH,
        image_token_id=vocab + 10, video_token_id=vocab + 11,
        vision_start_token_id=vocab + 12,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(dest / "text_encoder", safe_serialization=True)


def _scheduler_config(version: str) -> dict:
    if version == "v5":
        return {
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
            "beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False,
            "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
        }
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def write_tiny_model(dest: str | os.PathLike, version: str = "v5", seed: int = 0, kind: str = "inpaint") -> Path:
    """Write a complete tiny model folder (`version` "v5" or "v5.1"; `kind` one of KINDS) at `dest`
    atomically. Only the transformer's input channels differ between kinds, as in the published ones."""
    if version not in ("v5", "v5.1"):
        raise ValueError(f"version must be 'v5' or 'v5.1', got {version!r}")
    dest = Path(dest)
    with atomic_folder(dest, replace=True) as partial:  # DEST.partial, renamed onto dest once complete
        transformer = build_tiny_transformer(version, seed, kind)
        transformer.save_pretrained(partial / "transformer", safe_serialization=True)
        if version == "v5":
            # The published V5 checkpoints use the original EasyAnimate key names (attn2.* for the text
            # stream); write the tiny one the same way so the loader's conversion path is exercised.
            from safetensors.torch import save_file

            from .keymap import convert_diffusers_state_dict

            state = {k: v.contiguous() for k, v in convert_diffusers_state_dict(transformer.state_dict()).items()}
            save_file(state, str(partial / "transformer" / "diffusion_pytorch_model.safetensors"))
        vae = build_tiny_vae(seed)
        vae.save_pretrained(partial / "vae", safe_serialization=True)
        if version == "v5":
            # ... and their config.json files are dumps of the original classes' arguments.
            from .original_format import original_v5_transformer_config, original_v5_vae_config

            original = original_v5_transformer_config(transformer.config)
            (partial / "transformer" / "config.json").write_text(json.dumps(original, indent=2))
            (partial / "vae" / "config.json").write_text(json.dumps(original_v5_vae_config(vae.config), indent=2))
            _write_bert(partial, seed)
            _write_t5(partial, seed)
            pipeline_class = "EasyAnimateV5Pipeline"
        else:
            _write_qwen2vl(partial, seed)
            pipeline_class = "EasyAnimatePipeline"
        (partial / "scheduler").mkdir()
        (partial / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_config(version), indent=2))
        (partial / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class, "tiny": True}, indent=2))
    return dest


TINY_NAMES = {"v5": "tiny-EasyAnimateV5-zh-InP", "v5.1": "tiny-EasyAnimateV5.1-zh-InP"}
# The other published kinds (transformer in_channels from conditioning.PUBLISHED_IN_CHANNELS):
# key -> (version, kind, folder name).
KINDS = ("inpaint", "t2v", "control", "camera")
TINY_VARIANTS = {
    "v5-t2v": ("v5", "t2v", "tiny-EasyAnimateV5-zh"),
    "v5.1-t2v": ("v5.1", "t2v", "tiny-EasyAnimateV5.1-zh"),
    "v5-control": ("v5", "control", "tiny-EasyAnimateV5-zh-Control"),
    "v5.1-control": ("v5.1", "control", "tiny-EasyAnimateV5.1-zh-Control"),
    "v5.1-camera": ("v5.1", "camera", "tiny-EasyAnimateV5.1-zh-Control-Camera"),
}
TINY_VARIANT_NAMES = {key: name for key, (_, _, name) in TINY_VARIANTS.items()}


def _tiny_cache_root(cache_root) -> Path:
    import diffusers
    import transformers

    here = Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for name in ("tiny.py", "original_format.py", "keymap.py"):
        digest.update((here / name).read_bytes())
    digest.update(f"{diffusers.__version__}/{transformers.__version__}".encode())
    return Path(cache_root) / digest.hexdigest()[:12]


def cached_tiny_variants(cache_root: str | os.PathLike) -> dict[str, Path]:
    """{"v5-t2v": folder, ..., "v5.1-camera": folder} (TINY_VARIANTS) under `cache_root`, cached
    like `cached_tiny_models`."""
    root = _tiny_cache_root(cache_root)
    folders = {}
    for key, (version, kind, name) in TINY_VARIANTS.items():
        folder = root / name
        if not (folder / "model_index.json").is_file():
            write_tiny_model(folder, version, kind=kind)
        folders[key] = folder
    return folders


def cached_tiny_models(cache_root: str | os.PathLike) -> dict[str, Path]:
    """{"v5": folder, "v5.1": folder} under `cache_root`, written once and reused until the code
    that shapes them changes: this file, the original-format writers, or the diffusers /
    transformers versions that serialise them."""
    root = _tiny_cache_root(cache_root)
    folders = {}
    for version, name in TINY_NAMES.items():
        folder = root / name
        if not (folder / "model_index.json").is_file():
            write_tiny_model(folder, version)
        folders[version] = folder
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest")
    parser.add_argument("--version", choices=["v5", "v5.1"], default="v5")
    parser.add_argument("--kind", choices=KINDS, default="inpaint",
                        help="model kind (transformer input channels): inpaint 33, t2v 16, control 32 (V5) / 48 "
                             "(V5.1), camera 38 (V5.1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_model(args.dest, args.version, args.seed, args.kind))


if __name__ == "__main__":
    main()
