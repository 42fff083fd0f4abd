"""LoRA mixing as a node: several LoRAs with weights -> one LoRA file in models/loras."""

from __future__ import annotations

import logging
import os

import folder_paths
import torch
from comfy_api.latest import io

from ..easyanimate.lora_format import load_lora_file, save_lora_file
from ..easyanimate.lora_mix import mix_loras, rounding_error
from ..easyanimate.precision import SAVE_DTYPES
from .common import LORA_FOLDER, lora_file_names, output_subpath
from .schema import model_input, node_schema, shown, text_output

log = logging.getLogger(__name__)

SLOTS = 4
NONE = "[none]"


class EasyAnimateLoraMix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = [model_input("The model the LoRAs are for (their keys are checked against its transformer).")]
        for slot in range(1, SLOTS + 1):
            inputs.append(io.Combo.Input(f"lora_{slot}", options=[NONE] + lora_file_names(),
                                         default=NONE, optional=slot > 1,
                                         tooltip=f"LoRA {slot} from models/loras ({NONE}: skip)."))
            inputs.append(io.Float.Input(f"weight_{slot}", default=0.5, min=-10.0, max=10.0, step=0.01,
                                         optional=slot > 1, tooltip=f"Weight of LoRA {slot} in the mix (its strength)."))
        inputs += [
            io.Int.Input("target_rank", default=0, min=0, max=4096,
                         tooltip="0: exact mix (ranks concatenated: rank = sum of the ranks). N: reduce every "
                                 "module to rank N by SVD; the relative error is reported."),
            io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="bf16",
                           tooltip="bf16: the official files' dtype (relative error of the update about 0.2%, "
                                   "reported); fp32: exact."),
            io.String.Input("name", default="easyanimate_lora_mix",
                            tooltip="File name in models/loras ('.safetensors' is added); an existing file is never "
                                    "replaced."),
        ]
        return node_schema(
            "LoraMix", "EasyAnimate Mix LoRAs", "EasyAnimate/lora",
            "Mixes several LoRAs with weights into one LoRA file (e.g. 0.5 x HPS + 0.5 x MPS) in the official "
            "EasyAnimate format: applying it at strength 1 equals applying each LoRA at its weight (exact by "
            "concatenating ranks), or reduced to a target rank by SVD.",
            inputs=inputs,
            outputs=[text_output("lora_name", "The mixed LoRA, relative to models/loras."),
                     text_output("report", "Modules, ranks and the relative error.")],
            output_node=True,
        )

    @classmethod
    def execute(cls, model, target_rank, save_dtype, name, **kwargs) -> io.NodeOutput:
        chosen = [(kwargs[f"lora_{slot}"], float(kwargs.get(f"weight_{slot}", 0.5)))
                  for slot in range(1, SLOTS + 1) if kwargs.get(f"lora_{slot}") not in (None, "", NONE)]
        if not chosen:
            raise ValueError("Mix LoRAs: choose at least one LoRA")
        file_name = name.strip()
        if not file_name.endswith(".safetensors"):
            file_name += ".safetensors"
        loras_dir = folder_paths.get_folder_paths(LORA_FOLDER)[0]
        path = output_subpath(file_name, loras_dir)
        if path.exists():
            raise FileExistsError(f"Mix LoRAs: models/loras/{file_name} already exists; choose another name")
        loaded = [(load_lora_file(folder_paths.get_full_path_or_raise(LORA_FOLDER, lora), model.pipe.transformer), w)
                  for lora, w in chosen]
        mixed, report = mix_loras(loaded, target_rank or None)
        dtype = SAVE_DTYPES[save_dtype]
        text = " + ".join(f"{w:g} x {lora}" for lora, w in chosen) + f": {report.describe()}"
        if dtype != torch.float32:
            text += f"; {save_dtype} rounding {rounding_error(mixed, dtype):.2g}"
        os.makedirs(path.parent, exist_ok=True)
        save_lora_file(path, mixed, dtype=dtype)
        log.info("Mix LoRAs: wrote %s (%s)", path, text)
        return shown(file_name, text, text=text)


NODES = [EasyAnimateLoraMix]
