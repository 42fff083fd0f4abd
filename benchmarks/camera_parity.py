"""Camera conditioning vs the official EasyAnimate code, on the same presets.

Needs a checkout of aigc-apps/EasyAnimate (not shipped): its comfyui/utils.py (camera presets,
motion, join) and the pose functions of easyanimate/data/dataset_image_video.py (Camera,
get_relative_pose, ray_condition, process_pose_params) are loaded from there at run time (only those
definitions, through the AST, so the file's other imports are not needed) and compared with
easyanimate/camera.py. Prints the largest pose and Plücker differences.

    .venv/bin/python benchmarks/camera_parity.py --official PATH/TO/EasyAnimate
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

import numpy as np
import torch

from easyanimate_reward.easyanimate.camera import camera_motion

NAMES = {"Pan Up": "pan up", "Pan Left": "pan left", "Zoom In": "zoom in", "Zoom Out": "zoom out",
         "CW": "rotate clockwise", "ACW": "rotate anticlockwise", "Pan Down": "pan down", "Static": "static"}
POSE_DEFS = {"Camera", "custom_meshgrid", "get_relative_pose", "ray_condition", "process_pose_params"}


def load_official(root: Path):
    spec = importlib.util.spec_from_file_location("official_camera", root / "comfyui" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    tree = ast.parse((root / "easyanimate" / "data" / "dataset_image_video.py").read_text())
    body = [node for node in tree.body if getattr(node, "name", None) in POSE_DEFS]
    from einops import rearrange
    from packaging import version as pver

    namespace = {"np": np, "torch": torch, "rearrange": rearrange, "pver": pver}
    exec(compile(ast.Module(body=body, type_ignores=[]), "official_pose", "exec"), namespace)
    return utils, namespace


def official_rays(utils, pose, first, second, then, speed, frames, width, height, fx=0.474812461, fy=0.844111024):
    def motion(names):
        angle = sum(np.array(utils.CAMERA[n]["angle"]) for n in names)
        shift = sum(np.array(utils.CAMERA[n]["T"]) for n in names)
        return utils.get_camera_motion(angle, shift, speed, frames)

    poses = motion([first, second])
    if then:
        poses = utils.combine_camera_motion(poses, motion([then]))
    rows = [[fx, fy, 0.5, 0.5, 0, 0, *p[0], *p[1], *p[2]] for p in poses.tolist()]
    params = np.concatenate([np.zeros((len(rows), 1)), np.array(rows)], 1)
    return poses, pose["process_pose_params"](params, width=width, height=height).permute(3, 0, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of aigc-apps/EasyAnimate")
    args = parser.parse_args()
    utils, pose = load_official(args.official)
    cases = [("Pan Up", "Pan Left", None, 1.0, 49, 672, 384), ("Zoom In", "CW", "Pan Left", 1.3, 9, 48, 32),
             ("Zoom Out", "ACW", "Pan Down", 0.7, 13, 64, 112)]
    for first, second, then, speed, frames, width, height in cases:
        ref_poses, ref_rays = official_rays(utils, pose, first, second, then, speed, frames, width, height)
        ours = camera_motion([NAMES[first], NAMES[second]], speed, frames)
        if then:
            ours = ours.then(camera_motion([NAMES[then]], speed, frames))
        pose_err = np.abs(ours.poses.numpy() - ref_poses).max()
        ray_err = (ours.plucker(width, height) - ref_rays.float()).abs().max().item()
        label = f"{first} + {second}" + (f", then {then}" if then else "")
        print(f"{label:32s} {width}x{height}x{ours.frames}: poses max |diff| {pose_err:.2e}, "
              f"Plücker max |diff| {ray_err:.2e} (values up to {ref_rays.abs().max().item():.2f})")


if __name__ == "__main__":
    main()
