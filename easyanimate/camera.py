"""Camera motion for the V5.1 Control-Camera models: presets -> per-frame poses -> Plücker rays.

diffusers' EasyAnimateControlPipeline only takes a ready-made `control_camera_video`; turning
camera presets into it is done here. Facts from the official EasyAnimate code (comfyui/utils.py,
comfyui/comfyui_nodes.py camera nodes, easyanimate/data/dataset_image_video.py
process_pose_params / ray_condition, pipeline_easyanimate_control.py), which derive from CameraCtrl:

- A preset is a rotation vector (radians per unit, x/y/z) and a translation direction. Pan up
  T=(0,1,0), pan down (0,-1,0), pan left (1,0,0), pan right (-1,0,0), zoom in (0,0,-2), zoom out
  (0,0,2), rotate anticlockwise angle (0,0,1), clockwise (0,0,-1). Presets combine by adding
  their vectors ("Pan Up" + "Pan Left" moves diagonally).
- Frame i of n: angle * (i/n) * speed * pi/3, translation T * (i/n) * speed * 1.5; the rotation is
  Rz @ Ry @ Rx; the 3x4 [R | t] is the camera's world-to-camera matrix.
- "First A then B": B's poses are re-based on A's last pose (R_b @ R_a, t_b + R_b @ t_a).
- Intrinsics are fractions of the frame (defaults fx 0.474812461, fy 0.844111024, cx = cy = 0.5),
  for a 1280x720 pose frame; for another aspect ratio the official code rescales fx (wider pose
  frame) or fy (taller) before multiplying by the pixel size.
- Poses are made relative to the first camera (c2w_i' = w2c_0 @ c2w_i, the first one identity);
  every pixel centre (x + 0.5, y + 0.5) gets the ray direction d = normalise(R @ ((x - cx)/fx,
  (y - cy)/fy, 1)) and origin o = the camera centre; the Plücker embedding is (o x d, d): 6 channels.
- The conditioning the transformer sees: the (6, F, H, W) embedding resized to the latent grid
  with the first frame resized on its own (as the Magvit VAE treats frame 0 apart), times 6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BASE_TRANSLATION = 1.5
BASE_ANGLE = math.pi / 3
POSE_FRAME_SIZE = (1280, 720)  # width, height the preset intrinsics were written for
CAMERA_CHANNELS = 6
CAMERA_SCALE = 6.0
DEFAULT_INTRINSICS = (0.474812461, 0.844111024, 0.5, 0.5)  # fx, fy, cx, cy (fractions of the frame)

# name -> (rotation vector, translation direction)
PRESETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "static": ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    "pan up": ((0.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "pan down": ((0.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "pan left": ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0)),
    "pan right": ((0.0, 0.0, 0.0), (-1.0, 0.0, 0.0)),
    "zoom in": ((0.0, 0.0, 0.0), (0.0, 0.0, -2.0)),
    "zoom out": ((0.0, 0.0, 0.0), (0.0, 0.0, 2.0)),
    "rotate anticlockwise": ((0.0, 0.0, 1.0), (0.0, 0.0, 0.0)),
    "rotate clockwise": ((0.0, 0.0, -1.0), (0.0, 0.0, 0.0)),
}


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rz @ Ry @ Rx for angles (x, y, z) in radians."""
    ax, ay, az = (float(a) for a in angles)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


@dataclass(frozen=True)
class CameraPath:
    """Per-frame world-to-camera poses (F, 3, 4) plus intrinsics as fractions of the frame."""

    poses: torch.Tensor
    intrinsics: tuple[float, float, float, float] = DEFAULT_INTRINSICS

    def __post_init__(self):
        if self.poses.ndim != 3 or self.poses.shape[1:] != (3, 4) or self.poses.shape[0] < 1:
            raise ValueError(f"camera poses must be (frames, 3, 4), got {tuple(self.poses.shape)}")
        fx, fy, _, _ = self.intrinsics
        if fx <= 0 or fy <= 0:
            raise ValueError(f"camera focal lengths must be positive, got fx={fx}, fy={fy}")

    @property
    def frames(self) -> int:
        return self.poses.shape[0]

    def then(self, other: "CameraPath") -> "CameraPath":
        """This motion, then `other` continuing from where this one ends (official 'CameraJoin')."""
        last = self.poses[-1]
        r0, t0 = last[:, :3], last[:, 3]
        r1, t1 = other.poses[:, :, :3], other.poses[:, :, 3]
        joined = torch.cat([r1 @ r0, (t1 + (r1 @ t0[:, None])[..., 0])[..., None]], dim=2)
        return CameraPath(torch.cat([self.poses, joined]), self.intrinsics)

    def plucker(self, width: int, height: int, frames: int | None = None) -> torch.Tensor:
        """The Plücker ray embedding (6, F, H, W), float32, of the first `frames` poses."""
        poses = self.poses if frames is None else self.poses[:frames]
        fx, fy, cx, cy = self.intrinsics
        pose_ratio = POSE_FRAME_SIZE[0] / POSE_FRAME_SIZE[1]
        if pose_ratio > width / height:
            fx = height * pose_ratio * fx / width
        else:
            fy = width / pose_ratio * fy / height
        fx, fy, cx, cy = fx * width, fy * height, cx * width, cy * height

        count = poses.shape[0]
        w2c = torch.eye(4, dtype=torch.float64).repeat(count, 1, 1)
        w2c[:, :3] = poses.to(torch.float64)
        c2w = torch.linalg.inv(w2c)
        relative = w2c[:1] @ c2w
        relative[0] = torch.eye(4, dtype=torch.float64)
        relative = relative.float()

        y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                              torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
        directions = torch.stack([(x - cx) / fx, (y - cy) / fy, torch.ones_like(x)], dim=-1).reshape(-1, 3)
        directions = directions / directions.norm(dim=-1, keepdim=True)
        rays_d = directions[None] @ relative[:, :3, :3].transpose(1, 2)  # (F, HW, 3)
        rays_o = relative[:, None, :3, 3].expand_as(rays_d)
        plucker = torch.cat([torch.linalg.cross(rays_o, rays_d, dim=-1), rays_d], dim=-1)
        return plucker.reshape(count, height, width, 6).permute(3, 0, 1, 2).contiguous()


def camera_motion(motions: list[str] | tuple[str, ...], speed: float = 1.0, frames: int = 49,
                  intrinsics: tuple[float, float, float, float] = DEFAULT_INTRINSICS) -> CameraPath:
    """Poses for the sum of the preset `motions` (e.g. ["pan up", "pan left"]) over `frames` frames."""
    if frames < 1:
        raise ValueError(f"a camera motion needs at least one frame, got {frames}")
    unknown = [m for m in motions if m not in PRESETS]
    if unknown:
        raise ValueError(f"unknown camera motion {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    angle = torch.zeros(3, dtype=torch.float64)
    direction = torch.zeros(3, dtype=torch.float64)
    for name in motions:
        angle += torch.tensor(PRESETS[name][0], dtype=torch.float64)
        direction += torch.tensor(PRESETS[name][1], dtype=torch.float64)
    poses = []
    for i in range(frames):
        progress = i / frames * float(speed)
        rotation = _rotation(angle * progress * BASE_ANGLE)
        translation = direction * progress * BASE_TRANSLATION
        poses.append(torch.cat([rotation, translation[:, None]], dim=1))
    return CameraPath(torch.stack(poses), tuple(float(v) for v in intrinsics))
