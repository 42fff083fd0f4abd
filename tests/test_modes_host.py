"""The generation modes through the real ComfyUI server: camera motion + reward LoRA + reward scoring
on a Control-Camera model, aspect buckets, and a clear refusal of an image on a text-to-video model."""

from __future__ import annotations

import pytest
from PIL import Image

from easyanimate_reward.easyanimate.tiny import TINY_NAMES, TINY_VARIANT_NAMES
from easyanimate_reward.tools import workflows
from host import history_error

SAMPLER = dict(prompt="a cat", negative_prompt="", width=32, height=32, frames=5, steps=2, cfg=6.0, seed=1,
               scheduler="auto", videos=1, denoise_strength=1.0, guidance_rescale=0.0, base_resolution="width x height")
LOADER = dict(precision="fp32", gpu_memory_mode="none")


@pytest.fixture(scope="module")
def server(comfy_server):
    workflows.install_tiny_assets(comfy_server.base)
    lora = comfy_server.base / "models" / "loras" / "tiny-v51-modes.safetensors"
    if not lora.is_file():
        workflows.write_tiny_lora("v5.1", lora, seed=5)
    return comfy_server


def camera_graph(lora_strength: float) -> dict:
    return {
        "1": {"class_type": "EasyAnimateReward_ModelLoader", "inputs": {"model": TINY_VARIANT_NAMES["v5.1-camera"], **LOADER}},
        "2": {"class_type": "EasyAnimateReward_LoraApply", "inputs": {"model": ["1", 0], "lora_name": "tiny-v51-modes.safetensors",
                                                               "strength": lora_strength, "mode": "fused"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": workflows.TINY_START_IMAGE}},
        "4": {"class_type": "EasyAnimateReward_CameraMotion", "inputs": dict(motion="pan up", motion_2="none", motion_3="none",
                                                                     motion_4="none", speed=1.0, frames=3, fx=0.47,
                                                                     fy=0.84, cx=0.5, cy=0.5)},
        "5": {"class_type": "EasyAnimateReward_CameraMotion", "inputs": dict(motion="zoom in", motion_2="pan left",
                                                                     motion_3="none", motion_4="none", speed=1.0,
                                                                     frames=3, fx=0.47, fy=0.84, cx=0.5, cy=0.5,
                                                                     previous=["4", 0])},
        "6": {"class_type": "EasyAnimateReward_Sampler", "inputs": {"model": ["2", 0], **SAMPLER, "ref_image": ["3", 0],
                                                             "camera": ["5", 0]}},
        "7": {"class_type": "EasyAnimateReward_RewardModelLoader", "inputs": {"kind": "colorfulness", "device": "auto", "dtype": "auto"}},
        "8": {"class_type": "EasyAnimateReward_RewardScoreFrames", "inputs": {"reward": ["7", 0], "frames": ["6", 0], "prompt": "a cat",
                                                            "batch_size": 8}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
    }


def test_camera_motion_with_a_reward_lora_and_a_reward_on_the_host(server):
    scores = []
    for strength in (0.0, 1.0):
        entry = server.run(camera_graph(strength), timeout=600)
        assert history_error(entry) is None, f"{history_error(entry)}\n{server.log_tail(3000)}"
        scores.append(float("".join(entry["outputs"]["9"]["text"])))
    assert scores[0] != scores[1], scores  # the LoRA changed the Control-Camera video


def test_base_resolution_picks_the_bucket_on_the_host(server):
    graph = {
        "1": {"class_type": "EasyAnimateReward_ModelLoader", "inputs": {"model": TINY_NAMES["v5.1"], **LOADER}},
        "2": {"class_type": "LoadImage", "inputs": {"image": workflows.TINY_START_IMAGE}},  # 64x64: ratio 1
        "3": {"class_type": "EasyAnimateReward_Sampler", "inputs": {"model": ["1", 0], **SAMPLER, "frames": 1, "steps": 1,
                                                             "start_image": ["2", 0], "base_resolution": "512"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bucket"}},
    }
    entry = server.run(graph, timeout=600)
    assert history_error(entry) is None, history_error(entry)
    saved = entry["outputs"]["4"]["images"][0]
    image = Image.open(server.base / "output" / saved["subfolder"] / saved["filename"])
    assert image.size == (512, 512)


def test_an_image_on_a_text_to_video_model_is_refused_on_the_host(server):
    graph = {
        "1": {"class_type": "EasyAnimateReward_ModelLoader", "inputs": {"model": TINY_VARIANT_NAMES["v5-t2v"], **LOADER}},
        "2": {"class_type": "LoadImage", "inputs": {"image": workflows.TINY_START_IMAGE}},
        "3": {"class_type": "EasyAnimateReward_Sampler", "inputs": {"model": ["1", 0], **SAMPLER, "start_image": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    error = history_error(server.run(graph, timeout=600))
    assert error is not None and "start_image cannot be used with this text-to-video model" in error, error
    assert "in_channels 16" in error and "InP model" in error
