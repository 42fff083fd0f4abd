"""Find out what an EasyAnimate model folder is, and load it.

The layout is read from the folder's own config files, never from its name: a V5.1 folder that a
user renamed still samples with flow matching, and a V5 folder named "EasyAnimateV5.1-..." still
gets its DDIM scheduler.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .folder_files import FolderFileError, check_config_fits_weights, check_folder_files, read_shard_index
from .keymap import convert_original_state_dict, is_original_state_dict
from .memory import ModulePlacement
from .original_format import (is_original_transformer_config, is_original_vae_config, translate_transformer_config,
                              translate_vae_config)
from .model import EasyAnimatePipe
from .precision import PRECISIONS, apply_fp16_policy

log = logging.getLogger(__name__)

V5, V51 = "v5", "v5.1"


class ModelFolderError(ValueError):
    """A model folder is missing a file or holds something we cannot load. The message says which."""


@dataclass(frozen=True)
class ModelLayout:
    folder: Path
    version: str
    scheduler_class: str


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"missing {path} ({what}). An EasyAnimate model folder needs transformer/, vae/, "
                               "text_encoder/, tokenizer/ and scheduler/ (V5 also text_encoder_2/ and tokenizer_2/).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON ({what}): {e}") from e


def detect_layout(folder: str | os.PathLike) -> ModelLayout:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist; put EasyAnimate models under models/EasyAnimate/")
    _read_json(folder / "transformer" / "config.json", "transformer config")
    _read_json(folder / "vae" / "config.json", "VAE config")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    text_cfg = _read_json(folder / "text_encoder" / "config.json", "first text encoder config")
    text_type = text_cfg.get("model_type", "")
    if text_type == "bert":
        _read_json(folder / "text_encoder_2" / "config.json", "T5 text encoder config (V5 uses Bert + T5)")
        version = V5
    elif text_type in ("qwen2_vl", "qwen2_5_vl"):
        version = V51
    else:
        raise ModelFolderError(
            f"{folder / 'text_encoder' / 'config.json'} has model_type {text_type!r}; expected 'bert' "
            "(EasyAnimate V5, with a T5 in text_encoder_2/) or 'qwen2_vl' (EasyAnimate V5.1)")
    return ModelLayout(folder, version, scheduler_class(scheduler, folder / "scheduler" / "scheduler_config.json"))


def scheduler_class(config: dict, where: Path) -> str:
    """The config's `_class_name`, which must name a diffusers scheduler class (never any other
    class of the library: a model folder only chooses among schedulers)."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    name = config.get("_class_name", "")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelFolderError(f"{where}: _class_name {name!r} is not a diffusers scheduler class; the scheduler/ "
                               "folder needs a scheduler config such as DDIMScheduler or FlowMatchEulerDiscreteScheduler")
    return name


def _weight_files(subfolder: Path, stem: str) -> list[Path]:
    single = subfolder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = subfolder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:  # shard names stay inside the folder (no absolute paths, no ..)
            return read_shard_index(index, f"{stem} shard index")
        except FolderFileError as e:
            raise ModelFolderError(str(e)) from e
    raise ModelFolderError(f"missing weights in {subfolder}: expected {stem}.safetensors "
                           f"(or {stem}.safetensors.index.json with its shards)")


def _read_state_dict(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:  # safetensors raises several types for a truncated/corrupt file
            raise ModelFolderError(f"cannot read {f}: {e}. The file is corrupt or incomplete; download it again.") from e
        for k, v in part.items():
            state[k] = v.to(dtype) if v.is_floating_point() else v
    return state


def _config_for(cls, config: dict, where: Path) -> dict:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kept = {k: v for k, v in config.items() if k in accepted}
    ignored = sorted(k for k in config if k not in accepted and not k.startswith("_"))
    if ignored:
        log.info("%s: config keys not used by %s: %s", where, cls.__name__, ", ".join(ignored))
    return kept


def load_diffusers_module(cls, subfolder: Path, dtype: torch.dtype, convert_state_dict=None, translate_config=None):
    """Build `cls` from subfolder/config.json and load its safetensors strictly (one code path for
    diffusers-format and original-format checkpoints; `translate_config` rewrites an original-format
    config for `cls`, `convert_state_dict` renames original keys)."""
    from accelerate import init_empty_weights

    raw_config = _read_json(subfolder / "config.json", f"{cls.__name__} config")
    if translate_config is not None:
        try:
            raw_config = translate_config(raw_config)
        except ValueError as e:
            raise ModelFolderError(f"{subfolder / 'config.json'}: {e}") from e
    config = _config_for(cls, raw_config, subfolder)
    state = _read_state_dict(_weight_files(subfolder, "diffusion_pytorch_model"), dtype)
    if convert_state_dict is not None:
        state = convert_state_dict(state)
    with init_empty_weights():
        module = cls.from_config(config)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ModelFolderError(
            f"{subfolder} does not match its config for {cls.__name__}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(wrong)} shape mismatches {wrong[:5]}")
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()  # tensors were cast while reading; buffers keep their own dtype


def load_transformer(subfolder: Path, dtype: torch.dtype):
    from diffusers import EasyAnimateTransformer3DModel

    def convert(state):
        # Original EasyAnimate V5 checkpoints name the text stream attn2.*; diffusers, attn1.add_*.
        return convert_original_state_dict(state) if is_original_state_dict(state) else state

    def translate(config):
        # Published V5 folders carry EasyAnimate's own config (other defaults, extra keys).
        return translate_transformer_config(config) if is_original_transformer_config(config) else config

    return load_diffusers_module(EasyAnimateTransformer3DModel, subfolder, dtype, convert, translate)


def load_vae(subfolder: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKLMagvit

    def translate(config):
        # Same weights either way; only the original config's keys and defaults differ.
        return translate_vae_config(config) if is_original_vae_config(config) else config

    return load_diffusers_module(AutoencoderKLMagvit, subfolder, dtype, translate_config=translate)


def _load_hf(cls, folder: Path, dtype: torch.dtype):
    what = f"the {cls.__name__} text encoder: config.json and model.safetensors (or shards with their index)"
    try:  # before transformers reads anything: readable files, confined shards, config sized like the weights
        check_folder_files(folder, what)
        check_config_fits_weights(cls, folder)
    except FolderFileError as e:
        raise ModelFolderError(str(e)) from e
    try:
        return cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()
    except Exception as e:  # transformers/safetensors raise many types; name the folder either way
        raise ModelFolderError(f"cannot load {cls.__name__} from {folder} ({what}): {e}") from e


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    what = "tokenizer files (tokenizer.json / tokenizer_config.json, vocab or spiece.model)"
    if not folder.is_dir():
        raise ModelFolderError(f"missing tokenizer folder {folder} ({what})")
    try:
        check_folder_files(folder, what, weights=False)
    except FolderFileError as e:
        raise ModelFolderError(str(e)) from e
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # tokenizers raises its own exception types for garbage files
        raise ModelFolderError(f"cannot load the tokenizer in {folder} ({what}): {e}") from e


def load_pipe(folder: str | os.PathLike, precision: str = "bf16", memory_mode: str = "model_cpu_offload",
              device: torch.device | str = "cpu", offload_device: torch.device | str = "cpu",
              resident_blocks: int | None = None) -> EasyAnimatePipe:
    """Load every component of an EasyAnimate model folder and place them for `memory_mode`
    (`resident_blocks`: transformer blocks kept on the device under plain "block_swap")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    layout = detect_layout(folder)
    root = layout.folder
    transformer = load_transformer(root / "transformer", dtype)
    vae = load_vae(root / "vae", dtype)
    if layout.version == V5:
        from transformers import BertModel, T5EncoderModel

        text_encoder = _load_hf(BertModel, root / "text_encoder", dtype)
        text_encoder_2 = _load_hf(T5EncoderModel, root / "text_encoder_2", dtype)
        tokenizer = _load_tokenizer(root / "tokenizer")
        tokenizer_2 = _load_tokenizer(root / "tokenizer_2")
    else:
        from transformers import Qwen2VLForConditionalGeneration

        text_encoder = _load_hf(Qwen2VLForConditionalGeneration, root / "text_encoder", dtype)
        tokenizer = _load_tokenizer(root / "tokenizer")
        text_encoder_2 = tokenizer_2 = None
    _check_text_widths(layout, transformer, text_encoder, text_encoder_2)
    apply_fp16_policy(layout.version, dtype, transformer, vae)  # V5 in fp16: float32 VAE and attention

    for module in (transformer, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
    placement = ModulePlacement(memory_mode, device, offload_device, resident_blocks=resident_blocks)
    placement.prepare({"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
                       "text_encoder_2": text_encoder_2})
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    return EasyAnimatePipe(
        folder=str(root), version=layout.version, transformer=transformer, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, scheduler_config=scheduler_config, dtype=dtype, placement=placement,
    )


def _hidden_size(encoder) -> int:
    cfg = encoder.config
    text_cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "d_model")


def _check_text_widths(layout: ModelLayout, transformer, text_encoder, text_encoder_2) -> None:
    cfg = transformer.config
    width = _hidden_size(text_encoder)
    if cfg.text_embed_dim != width:
        raise ModelFolderError(
            f"{layout.folder}: transformer expects text width {cfg.text_embed_dim} but text_encoder/ "
            f"produces {width}; the folder mixes parts of different models")
    if text_encoder_2 is not None and cfg.text_embed_dim_t5 != _hidden_size(text_encoder_2):
        raise ModelFolderError(
            f"{layout.folder}: transformer expects T5 width {cfg.text_embed_dim_t5} but text_encoder_2/ "
            f"produces {_hidden_size(text_encoder_2)}")
