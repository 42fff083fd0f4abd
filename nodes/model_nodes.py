"""Load EasyAnimate models and sample videos."""

from __future__ import annotations

from comfy_api.latest import io

from ..easyanimate.loading import PRECISIONS
from ..easyanimate.memory import MEMORY_MODES
from ..easyanimate.model import EasyAnimateModel
from ..easyanimate.sampling import SampleRequest, check_video_size, sample_video
from ..easyanimate.step_cache import DEFAULT_TEACACHE_THRESHOLD
from .common import PIPES, model_folder_names, progress_callback, resolve_model_folder
from .mode_nodes import BASE_RESOLUTION_CHOICES, mode_inputs, mode_request_fields
from .sampler_inputs import request_fields, sampler_inputs
from .schema import image_output, model_input, model_output, node_id, node_schema
from .speed import PREVIEW_EVERY, latent_previewer, speed_inputs

CATEGORY = "EasyAnimate"
SAMPLER_FIELDS = ("prompt", "negative_prompt", "width", "height", "frames", "steps", "cfg", "seed", "scheduler",
                  "videos")
MEMORY_MODE_TOOLTIP = (
    "none: all on the GPU. model_cpu_offload: each part on the GPU only while used. model_cpu_offload_and_qfloat8: "
    "also stores transformer Linear weights in fp8 (half the VRAM, small quality cost; norm modulation and proj_out "
    "stay in the compute dtype). sequential_cpu_offload: layer by layer (least VRAM, slowest). block_swap_N: N "
    "transformer blocks stay on the GPU, the rest stream from pinned RAM with prefetch (12b has 48 blocks, 7b 36; "
    "faster than sequential).")


class EasyAnimateModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ModelLoader", "Load EasyAnimate Model", CATEGORY,
            "Loads an EasyAnimate V5 (Bert+T5, DDIM) or V5.1 (Qwen2-VL, flow matching) model folder from "
            "models/EasyAnimate. The version is read from the folder's config files.",
            inputs=[
                io.Combo.Input("model", options=model_folder_names(),
                               tooltip="A folder in models/EasyAnimate (transformer/, vae/, text_encoder/, tokenizer/, "
                                       "scheduler/; V5 also text_encoder_2/, tokenizer_2/)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16",
                               tooltip="Weight and compute dtype. bf16 is what the models were trained in."),
                io.Combo.Input("gpu_memory_mode", options=list(MEMORY_MODES), default="model_cpu_offload",
                               tooltip=MEMORY_MODE_TOOLTIP),
            ],
            outputs=[model_output("The loaded model, for samplers, Apply LoRA, the trainer and the sweep.")],
        )

    @classmethod
    def execute(cls, model, precision, gpu_memory_mode) -> io.NodeOutput:
        pipe = PIPES.get(resolve_model_folder(model), precision, gpu_memory_mode)
        return io.NodeOutput(EasyAnimateModel(pipe))


class EasyAnimateSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "Sampler", "EasyAnimate Sampler", CATEGORY,
            "Text-to-video; image-to-video with a start and/or end image (InP models); video-to-video with a denoise "
            "strength (any model); control video + reference image (Control models); camera motion (Control-Camera "
            "models). The model kind is read from the model's config. Outputs the frames as an IMAGE batch, videos "
            "one after another.",
            inputs=[
                model_input("The model to sample with (its LoRA stack is patched in first)."),
                *sampler_inputs(*SAMPLER_FIELDS),
                io.Image.Input("start_image", optional=True,
                               tooltip="Image-to-video: the first frame. Resized to width x height."),
                *speed_inputs(),
                *mode_inputs(),
            ],
            outputs=[image_output("frames", "The videos' frames (N, H, W, 3), video after video.")],
            node_id_input=True,
        )

    @classmethod
    def execute(cls, model, prompt, negative_prompt, width, height, frames, steps, cfg, seed, scheduler,
                videos=1, start_image=None, shift=0.0, teacache=False, teacache_threshold=DEFAULT_TEACACHE_THRESHOLD,
                cfg_skip_ratio=0.0, preview_every=PREVIEW_EVERY, **modes) -> io.NodeOutput:
        if modes.get("base_resolution", BASE_RESOLUTION_CHOICES[0]) == BASE_RESOLUTION_CHOICES[0]:
            check_video_size(width, height, frames)
        start = None if start_image is None else start_image[:1].permute(0, 3, 1, 2)
        request = SampleRequest(**request_fields(prompt=prompt, negative_prompt=negative_prompt, width=width,
                                                 height=height, frames=frames, steps=steps, cfg=cfg, seed=seed,
                                                 videos=videos, scheduler=scheduler),
                                start_image=start, shift=shift, teacache=teacache, teacache_threshold=teacache_threshold,
                                cfg_skip_ratio=cfg_skip_ratio, **mode_request_fields(**modes))
        on_step = progress_callback(steps * videos, node_id(cls), preview=latent_previewer(model.pipe, preview_every))
        return io.NodeOutput(sample_video(model, request, on_step))


NODES = [EasyAnimateModelLoader, EasyAnimateSampler]
