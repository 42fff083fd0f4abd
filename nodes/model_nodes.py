"""Load EasyAnimate models and sample videos."""

from __future__ import annotations

from comfy_api.latest import io

from ..easyanimate.loading import PRECISIONS
from ..easyanimate.memory import MEMORY_MODES
from ..easyanimate.model import EasyAnimateModel
from ..easyanimate.sampling import SCHEDULER_CHOICES, SampleRequest, check_video_size, sample_video
from ..easyanimate.step_cache import DEFAULT_TEACACHE_THRESHOLD
from .common import PIPES, model_folder_names, progress_callback, resolve_model_folder
from .mode_nodes import BASE_RESOLUTION_CHOICES, mode_inputs, mode_request_fields
from .speed import PREVIEW_EVERY, latent_previewer, speed_inputs
from .types import EasyAnimateModelType


class EasyAnimateModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateReward_ModelLoader",
            display_name="Load EasyAnimate Model",
            category="EasyAnimate",
            description="Loads an EasyAnimate V5 (Bert+T5, DDIM) or V5.1 (Qwen2-VL, flow matching) model folder "
                        "from models/EasyAnimate. The version is read from the folder's config files.",
            inputs=[
                io.Combo.Input("model", options=model_folder_names(),
                               tooltip="A folder in models/EasyAnimate (transformer/, vae/, text_encoder/, tokenizer/, "
                                       "scheduler/; V5 also text_encoder_2/, tokenizer_2/)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16",
                               tooltip="Weight and compute dtype. bf16 is what the models were trained in."),
                io.Combo.Input("gpu_memory_mode", options=list(MEMORY_MODES), default="model_cpu_offload",
                               tooltip="none: all on the GPU. model_cpu_offload: each part on the GPU only while used. "
                                       "model_cpu_offload_and_qfloat8: also stores transformer Linear weights in fp8 "
                                       "(half the VRAM, small quality cost; norm modulation and proj_out stay in the "
                                       "compute dtype). sequential_cpu_offload: layer by layer (least VRAM, slowest). "
                                       "block_swap_N: N transformer blocks stay on the GPU, the rest stream from "
                                       "pinned RAM with prefetch (12b has 48 blocks, 7b 36; faster than sequential)."),
            ],
            outputs=[EasyAnimateModelType.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, precision, gpu_memory_mode) -> io.NodeOutput:
        pipe = PIPES.get(resolve_model_folder(model), precision, gpu_memory_mode)
        return io.NodeOutput(EasyAnimateModel(pipe))


class EasyAnimateSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateReward_Sampler",
            hidden=[io.Hidden.unique_id],  # cls.hidden.unique_id: progress bar and text on this node
            display_name="EasyAnimate Sampler",
            category="EasyAnimate",
            description="Text-to-video; image-to-video with a start and/or end image (InP models); video-to-video "
                        "with a denoise strength (any model); control video + reference image (Control models); "
                        "camera motion (Control-Camera models). The model kind is read from the model's "
                        "config. Outputs the frames as an IMAGE batch, videos one after another.",
            inputs=[
                EasyAnimateModelType.Input("model"),
                io.String.Input("prompt", multiline=True, default="A cat playing the piano in a sunny room.",
                                tooltip="What the video shows."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to steer away from (used when cfg > 1)."),
                io.Int.Input("width", default=384, min=16, max=2048, step=16, tooltip="Multiple of 16."),
                io.Int.Input("height", default=384, min=16, max=2048, step=16, tooltip="Multiple of 16."),
                io.Int.Input("frames", default=25, min=1, max=145, step=4,
                             tooltip="1 + 4k frames (1, 5, 9, ... 49): the VAE compresses time by 4."),
                io.Int.Input("steps", default=30, min=1, max=200, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=20.0, step=0.1,
                               tooltip="Classifier-free guidance scale; 1 disables guidance."),
                io.Int.Input("seed", default=43, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Each video gets seed, seed+1, ...: a seed gives the same video in any batch."),
                io.Combo.Input("scheduler", options=list(SCHEDULER_CHOICES), default="auto",
                               tooltip="auto: the model folder's own scheduler. V5 (noise prediction): DDIM, Euler, "
                                       "Euler A, DPM++, PNDM (4 steps or more). V5.1 (flow matching): Flow (Euler), "
                                       "Flow UniPC, Flow DPM++ (multistep: good at 20-30 steps)."),
                io.Int.Input("videos", default=1, min=1, max=64,
                             tooltip="How many videos (seeds) to sample; e.g. candidates for best-of-N ranking."),
                io.Image.Input("start_image", optional=True,
                               tooltip="Image-to-video: the first frame. Resized to width x height."),
                *speed_inputs(),
                *mode_inputs(),
            ],
            outputs=[io.Image.Output(display_name="frames")],
        )

    @classmethod
    def execute(cls, model, prompt, negative_prompt, width, height, frames, steps, cfg, seed, scheduler,
                videos=1, start_image=None, shift=0.0, teacache=False, teacache_threshold=DEFAULT_TEACACHE_THRESHOLD,
                cfg_skip_ratio=0.0, preview_every=PREVIEW_EVERY, **modes) -> io.NodeOutput:
        if modes.get("base_resolution", BASE_RESOLUTION_CHOICES[0]) == BASE_RESOLUTION_CHOICES[0]:
            check_video_size(width, height, frames)
        start = None if start_image is None else start_image[:1].permute(0, 3, 1, 2)
        request = SampleRequest(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                                frames=frames, steps=steps, guidance_scale=cfg, seed=seed, videos=videos,
                                scheduler=scheduler, start_image=start, shift=shift, teacache=teacache,
                                teacache_threshold=teacache_threshold, cfg_skip_ratio=cfg_skip_ratio,
                                **mode_request_fields(**modes))
        on_step = progress_callback(steps * videos, cls.hidden.unique_id if cls.hidden else None,
                                    preview=latent_previewer(model.pipe, preview_every))
        return io.NodeOutput(sample_video(model, request, on_step))


NODES = [EasyAnimateModelLoader, EasyAnimateSampler]
