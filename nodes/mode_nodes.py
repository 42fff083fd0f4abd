"""Generation-mode inputs of the sampler (video-to-video, end image, Control, Control-Camera,
aspect buckets, guidance rescale) and the camera-motion node."""

from __future__ import annotations

from comfy_api.latest import io

from ..easyanimate.buckets import BASE_RESOLUTIONS
from ..easyanimate.camera import DEFAULT_INTRINSICS, PRESETS, camera_motion
from .schema import node_schema
from .types import CameraType

BASE_RESOLUTION_CHOICES = ("width x height",) + tuple(str(r) for r in BASE_RESOLUTIONS)
NO_MOTION = "none"


def _frames(images):
    """ComfyUI IMAGE (N, H, W, 3) -> (N, 3, H, W); None stays None."""
    return None if images is None else images.permute(0, 3, 1, 2)


def mode_inputs() -> list:
    """Optional sampler inputs, appended after start_image (their order is part of saved workflows)."""
    return [
        io.Image.Input("end_image", optional=True,
                       tooltip="InP models: the last frame (with or without a start image)."),
        io.Image.Input("video", optional=True,
                       tooltip="Video-to-video: frames to refine (at least `frames` of them; the first `frames` are "
                               "used). Encoded, noised to denoise_strength and denoised from there. Any model kind."),
        io.Float.Input("denoise_strength", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                       tooltip="Video-to-video: 1 ignores the input video (text-to-video); lower keeps more of it "
                               "(0.7 is the official default). Runs int(steps x strength) steps."),
        io.Image.Input("control_video", optional=True,
                       tooltip="Control models: canny / depth / pose frames made with any preprocessor (at least "
                               "`frames` of them)."),
        io.Image.Input("ref_image", optional=True,
                       tooltip="V5.1 Control and Control-Camera models: the reference (first-frame) image."),
        CameraType.Input("camera", optional=True,
                         tooltip="Control-Camera models: the camera motion (EasyAnimate Camera Motion node)."),
        io.Float.Input("guidance_rescale", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip="Rescales the guided prediction toward the conditional one's spread (fixes "
                               "over-exposure at high cfg); 0 is off, 0.7 the paper's value."),
        io.Combo.Input("base_resolution", options=list(BASE_RESOLUTION_CHOICES), default=BASE_RESOLUTION_CHOICES[0],
                       optional=True,
                       tooltip="width x height: use the widgets above. 512/768/960/1024: the trained size closest to "
                               "the input's aspect ratio (reference image, control video, input video or start "
                               "image), as the official nodes do."),
    ]


_IMAGE_FIELDS = ("end_image", "video", "control_video", "ref_image")


def mode_request_fields(**inputs) -> dict:
    """SampleRequest fields from the node's mode inputs (other keyword arguments are ignored)."""
    fields = {name: _frames(inputs.get(name)) for name in _IMAGE_FIELDS}
    fields["end_image"] = None if fields["end_image"] is None else fields["end_image"][:1]
    fields["ref_image"] = None if fields["ref_image"] is None else fields["ref_image"][:1]
    fields["camera"] = inputs.get("camera")
    fields["denoise_strength"] = float(inputs.get("denoise_strength", 1.0))
    fields["guidance_rescale"] = float(inputs.get("guidance_rescale", 0.0))
    base = inputs.get("base_resolution", BASE_RESOLUTION_CHOICES[0])
    fields["base_resolution"] = None if base == BASE_RESOLUTION_CHOICES[0] else int(base)
    return fields


class EasyAnimateCameraMotion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        motions = [NO_MOTION] + list(PRESETS)
        return node_schema(
            "CameraMotion", "EasyAnimate Camera Motion", "EasyAnimate",
            "Camera motion for V5.1 Control-Camera models: up to four presets added together (e.g. pan up + pan "
            "left = diagonal), over `frames` frames at `speed`. Chain a `previous` motion to play it first and this "
            "one after it.",
            inputs=[
                io.Combo.Input("motion", options=list(PRESETS), default="pan up", tooltip="The camera move."),
                io.Combo.Input("motion_2", options=motions, default=NO_MOTION, tooltip="Added to the first."),
                io.Combo.Input("motion_3", options=motions, default=NO_MOTION, tooltip="Added to the first."),
                io.Combo.Input("motion_4", options=motions, default=NO_MOTION, tooltip="Added to the first."),
                io.Float.Input("speed", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="How far the camera moves over the clip (1 = the official presets)."),
                io.Int.Input("frames", default=49, min=1, max=1024,
                             tooltip="Frames of this motion; at least the sampler's frames in total."),
                io.Float.Input("fx", default=DEFAULT_INTRINSICS[0], min=0.01, max=4.0, step=0.001,
                               tooltip="Focal length / frame width for a 1280x720 frame (official default)."),
                io.Float.Input("fy", default=DEFAULT_INTRINSICS[1], min=0.01, max=4.0, step=0.001,
                               tooltip="Focal length / frame height for a 1280x720 frame (official default)."),
                io.Float.Input("cx", default=DEFAULT_INTRINSICS[2], min=0.0, max=1.0, step=0.01,
                               tooltip="Principal point x, fraction of the width."),
                io.Float.Input("cy", default=DEFAULT_INTRINSICS[3], min=0.0, max=1.0, step=0.01,
                               tooltip="Principal point y, fraction of the height."),
                CameraType.Input("previous", optional=True,
                                 tooltip="Play this motion first, then the one set here, continuing from its last pose."),
            ],
            outputs=[CameraType.Output(display_name="camera",
                                       tooltip="The camera path, for the sampler's camera input or another motion's "
                                               "previous.")],
        )

    @classmethod
    def execute(cls, motion, motion_2, motion_3, motion_4, speed, frames, fx, fy, cx, cy,
                previous=None) -> io.NodeOutput:
        names = [m for m in (motion, motion_2, motion_3, motion_4) if m != NO_MOTION]
        path = camera_motion(names, speed, frames, (fx, fy, cx, cy))
        return io.NodeOutput(path if previous is None else previous.then(path))


NODES = [EasyAnimateCameraMotion]
