"""The pack inside the real ComfyUI host: node registration, sampling workflows, bad input."""

from host import history_error

FOUNDATION_NODES = {"EasyAnimateReward_ModelLoader", "EasyAnimateReward_Sampler"}


def t2v_graph(model_name: str, frames: int = 5, seed: int = 1, extra_sampler: dict | None = None) -> dict:
    sampler = {"model": ["1", 0], "prompt": "a cat playing piano", "negative_prompt": "", "width": 32,
               "height": 32, "frames": frames, "steps": 3, "cfg": 6.0, "seed": seed, "scheduler": "auto",
               "videos": 1}
    sampler.update(extra_sampler or {})
    return {
        "1": {"class_type": "EasyAnimateReward_ModelLoader",
              "inputs": {"model": model_name, "precision": "fp32", "gpu_memory_mode": "none"}},
        "2": {"class_type": "EasyAnimateReward_Sampler", "inputs": sampler},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t2v"}},
    }


def test_object_info_lists_the_pack_nodes(comfy_server):
    info = comfy_server.object_info()
    missing = FOUNDATION_NODES - set(info)
    assert not missing, f"nodes not registered: {missing}\n{comfy_server.log_tail()}"
    loader = info["EasyAnimateReward_ModelLoader"]["input"]["required"]
    models = loader["model"][0] if isinstance(loader["model"][0], list) else loader["model"][1]["options"]
    assert "tiny-EasyAnimateV5-zh-InP" in models and "tiny-EasyAnimateV5.1-zh-InP" in models


def test_both_layouts_sample_through_the_server(comfy_server):
    for name in ("tiny-EasyAnimateV5-zh-InP", "tiny-EasyAnimateV5.1-zh-InP"):
        entry = comfy_server.run(t2v_graph(name, frames=5))
        assert history_error(entry) is None, history_error(entry)
        images = entry["outputs"]["3"]["images"]
        assert len(images) == 5  # 5 frames saved as 5 images by the host's own SaveImage
        out = comfy_server.base / "output" / images[0]["subfolder"] / images[0]["filename"]
        assert out.is_file() and out.stat().st_size > 0


def test_bad_frames_is_a_clear_error_and_server_keeps_serving(comfy_server):
    entry = comfy_server.run(t2v_graph("tiny-EasyAnimateV5-zh-InP", frames=6, seed=2))
    err = history_error(entry)
    assert err is not None and "1 + 4k" in err, err
    entry = comfy_server.run(t2v_graph("tiny-EasyAnimateV5-zh-InP", frames=5, seed=3))
    assert history_error(entry) is None


def test_missing_model_file_names_the_file(comfy_server, tiny_models, tmp_path):
    import shutil

    broken = comfy_server.base / "models" / "EasyAnimate" / "broken-model"
    if not broken.exists():
        shutil.copytree(tiny_models["v5"], broken)
        (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    entry = comfy_server.run(t2v_graph("broken-model", seed=4))
    err = history_error(entry)
    assert err is not None and "diffusion_pytorch_model.safetensors" in err and "vae" in err, err
    entry = comfy_server.run(t2v_graph("tiny-EasyAnimateV5.1-zh-InP", seed=5))
    assert history_error(entry) is None


def test_interrupt_stops_sampling_between_steps(comfy_server):
    import time

    # 20 videos x 200 steps: minutes of work, so the cancel must land mid-sampling.
    graph = t2v_graph("tiny-EasyAnimateV5-zh-InP", frames=17, seed=11,
                      extra_sampler={"steps": 200, "width": 64, "height": 64, "videos": 20})
    queued = comfy_server.queue(graph)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until this prompt is the one running
        running = comfy_server.get("/queue")["queue_running"]
        if any(item[1] == queued["prompt_id"] for item in running):
            break
        time.sleep(0.2)
    time.sleep(1.5)
    started = time.time()
    comfy_server.interrupt()
    entry = comfy_server.wait(queued["prompt_id"], timeout=120)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert time.time() - started < 30  # honoured between steps, not after the whole job
    entry = comfy_server.run(t2v_graph("tiny-EasyAnimateV5-zh-InP", seed=12))
    assert history_error(entry) is None
