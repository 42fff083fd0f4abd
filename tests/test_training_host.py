"""Reward LoRA training inside the real ComfyUI host: train, save to models/loras, reload by name
with the LoRA apply node, and cancel a run from the server."""

import json
import time

import numpy as np
from PIL import Image

from host import history_error
from train_graph import trainer_graph

MODEL = "tiny-EasyAnimateV5-zh-InP"
PROMPT = "a cat playing piano in a sunny room"


def trainer_inputs(lora_name: str, **overrides) -> dict:
    inputs = {
        "model": ["1", 0], "reward": ["2", 0], "prompts": PROMPT + "\na dog running on the beach at sunset",
        "negative_prompt": "", "width": 32, "height": 32, "frames": 5, "train_steps": 3, "sampling_steps": 3,
        "cfg": 4.0, "backprop": "tail", "backprop_k": 2, "backprop_start": 0, "backprop_end": -1,
        "backprop_steps": "", "drtune": False, "num_decoded_latents": 1, "num_sampled_frames": 1, "rank": 4,
        "alpha": 4.0, "target_modules": "", "learning_rate": 0.1, "weight_decay": 0.0, "adam_eps": 1e-10,
        "max_grad_norm": 1.0, "grad_accumulation": 1, "batch_size": 1, "seed": 3, "max_reward": "",
        "loss_scale": 1.0, "save_every": 0, "lora_name": lora_name, "eval_prompts": "a red car driving at night",
        "eval_every": 3, "early_stop_patience": 0, "gradient_checkpointing": True,
    }
    inputs.update(overrides)
    return inputs


def sampler(model_ref, seed=11) -> dict:
    return {"class_type": "EasyAnimateReward_Sampler",
            "inputs": {"model": model_ref, "prompt": PROMPT, "negative_prompt": "", "width": 32, "height": 32,
                       "frames": 5, "steps": 3, "cfg": 4.0, "seed": seed, "scheduler": "auto", "videos": 1}}


def loaders() -> dict:
    return {
        "1": {"class_type": "EasyAnimateReward_ModelLoader",
              "inputs": {"model": MODEL, "precision": "fp32", "gpu_memory_mode": "none"}},
        "2": {"class_type": "EasyAnimateReward_RewardModelLoader",
              "inputs": {"kind": "saturation", "device": "cpu", "dtype": "float32"}},
    }


def saved_frames(server, entry, node: str) -> np.ndarray:
    images = entry["outputs"][node]["images"]
    return np.stack([np.asarray(Image.open(server.base / "output" / i["subfolder"] / i["filename"]), dtype=np.int16)
                     for i in images])


def test_train_save_reload_and_apply_by_name(comfy_server):
    from easyanimate_reward.easyanimate.loading import load_pipe
    from easyanimate_reward.easyanimate.lora_format import load_lora_file

    graph = loaders()
    graph.update(trainer_graph("3", trainer_inputs("host test/reward lora")))
    graph["4"] = sampler(["3", 0])
    graph["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "trained"}}
    graph["6"] = sampler(["1", 0])
    graph["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "base"}}
    entry = comfy_server.run(graph)
    assert history_error(entry) is None, history_error(entry) + comfy_server.log_tail()

    name = "host test/reward lora.safetensors"
    lora_file = comfy_server.base / "models" / "loras" / "host test" / "reward lora.safetensors"
    assert lora_file.is_file() and name in entry["outputs"]["3"]["text"][0]
    run_folder = comfy_server.base / "output" / "easyanimate_reward_runs" / "host test" / "reward lora"
    sidecar = json.loads((run_folder / "run.json").read_text())
    assert sidecar["step"] == 3 and sidecar["history"]["eval_step"] == [0, 3]
    # The training state for an exact resume lives in the run folder, and the best held-out LoRA
    # named in the summary beside the LoRA.
    assert sidecar["state_file"] == "training_state.safetensors" and (run_folder / sidecar["state_file"]).is_file()
    picker = comfy_server.object_info()["EasyAnimateReward_LoraApply"]["input"]["required"]["lora_name"]
    options = picker[0] if isinstance(picker[0], list) else picker[1]["options"]
    assert name in options and not any("training_state" in o for o in options)
    best_file = lora_file.with_name("reward lora.best.safetensors")
    assert sidecar["best_file"] == best_file.name and best_file.is_file()
    assert "models/loras/host test/reward lora.best.safetensors" in entry["outputs"]["3"]["text"][0]
    assert len(entry["outputs"]["3"]["images"]) == 1  # the reward/loss plot preview
    # Official kohya keys, and it loads onto the model it was trained on.
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        assert any(k.startswith("lora_unet__transformer_blocks_0_attn1_to_q.") for k in f.keys())
    pipe = load_pipe(comfy_server.base / "models" / "EasyAnimate" / MODEL, "fp32", "none")
    assert load_lora_file(lora_file, pipe.transformer).ranks == {4}
    assert load_lora_file(best_file, pipe.transformer).ranks == {4}

    trained, base = saved_frames(comfy_server, entry, "5"), saved_frames(comfy_server, entry, "7")
    assert np.abs(trained - base).max() > 2  # the LoRA changed the video

    # Picking the file by name in the apply node gives the same video as the trainer's output model.
    again = loaders()
    again["3"] = {"class_type": "EasyAnimateReward_LoraApply",
                  "inputs": {"model": ["1", 0], "lora_name": name, "strength": 1.0, "mode": "fused"}}
    again["4"] = sampler(["3", 0])
    again["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "applied"}}
    del again["2"]
    entry2 = comfy_server.run(again)
    assert history_error(entry2) is None, history_error(entry2)
    applied = saved_frames(comfy_server, entry2, "5")
    assert np.abs(applied - trained).max() <= 1


def test_cancel_keeps_the_last_checkpoint(comfy_server):
    from easyanimate_reward.easyanimate.loading import load_pipe
    from easyanimate_reward.training.checkpoint import load_checkpoint

    graph = loaders()
    graph.update(trainer_graph("3", trainer_inputs("cancelled", train_steps=500, save_every=1, eval_every=0, cfg=1.0,
                                                   sampling_steps=2)))
    graph["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}}
    queued = comfy_server.queue(graph)
    assert "prompt_id" in queued, queued
    sidecar = comfy_server.base / "output" / "easyanimate_reward_runs" / "cancelled" / "training_state.safetensors"
    deadline = time.time() + 120
    while not sidecar.is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert sidecar.is_file(), comfy_server.log_tail()
    comfy_server.interrupt()
    entry = comfy_server.wait(queued["prompt_id"], timeout=120)
    messages = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in messages, messages
    pipe = load_pipe(comfy_server.base / "models" / "EasyAnimate" / MODEL, "fp32", "none")
    from easyanimate_reward.training.run_layout import RunLayout

    layout = RunLayout(comfy_server.base / "models" / "loras" / "cancelled.safetensors", sidecar.parent)
    weights, state = load_checkpoint(layout, pipe.transformer)
    assert 1 <= state.step < 500 and "interrupted" in json.loads(layout.run_json.read_text())["stop_reason"]
    assert len(state.history["reward"]) == state.step


def test_lora_name_cannot_escape_the_loras_folder(comfy_server):
    graph = loaders()
    graph.update(trainer_graph("3", trainer_inputs("../../escaped", train_steps=1)))
    entry = comfy_server.run(graph)
    err = history_error(entry)
    assert err is not None and "must be a relative path inside" in err and "models/loras" in err, err
    assert not list(comfy_server.base.parent.rglob("escaped.safetensors"))
