"""LoRA strength on the real host: base vs 0.7 vs 0.3 in one graph, live strength changes, and a
LoRA made for another model failing clearly."""

import numpy as np
from PIL import Image

from easyanimate_reward.tools.workflows import write_tiny_lora
from host import history_error

V5 = "tiny-EasyAnimateV5-zh-InP"
V51 = "tiny-EasyAnimateV5.1-zh-InP"
LORA = "tiny-v5-reward-lora-host.safetensors"


def _sampler(model_ref, seed=5):
    return {"class_type": "EasyAnimateReward_Sampler",
            "inputs": {"model": model_ref, "prompt": "a cat playing piano", "negative_prompt": "", "width": 32,
                       "height": 32, "frames": 5, "steps": 3, "cfg": 6.0, "seed": seed, "scheduler": "auto",
                       "videos": 1}}


def _lora(strength, model=("1", 0)):
    return {"class_type": "EasyAnimateReward_LoraApply",
            "inputs": {"model": list(model), "lora_name": LORA, "strength": strength, "mode": "fused"}}


def _save(images, prefix):
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def _frames(server, entry, node):
    out = []
    for image in entry["outputs"][node]["images"]:
        path = server.base / "output" / image["subfolder"] / image["filename"]
        out.append(np.asarray(Image.open(path), dtype=np.float32) / 255)
    return np.stack(out)


def _loader(name):
    return {"class_type": "EasyAnimateReward_ModelLoader",
            "inputs": {"model": name, "precision": "fp32", "gpu_memory_mode": "none"}}


def _graph(strength_a, strength_b, tag):
    return {
        "1": _loader(V5),
        "2": _lora(strength_a), "3": _lora(strength_b),
        "4": _sampler(["1", 0]), "5": _sampler(["2", 0]), "6": _sampler(["3", 0]),
        "7": _save(["4", 0], f"{tag}_base"), "8": _save(["5", 0], f"{tag}_a"), "9": _save(["6", 0], f"{tag}_b"),
    }


def test_base_and_two_strengths_in_one_graph(comfy_server):
    write_tiny_lora("v5", comfy_server.base / "models" / "loras" / LORA, seed=3)
    # The base alone, first: the reference the base branch must still match after LoRAs ran.
    alone = comfy_server.run({"1": _loader(V5), "4": _sampler(["1", 0]), "7": _save(["4", 0], "alone")})
    assert history_error(alone) is None, history_error(alone)
    base_alone = _frames(comfy_server, alone, "7")

    entry = comfy_server.run(_graph(0.7, 0.3, "s73"))
    assert history_error(entry) is None, history_error(entry)
    base, s07, s03 = (_frames(comfy_server, entry, n) for n in ("7", "8", "9"))
    assert np.array_equal(base, base_alone), "the base branch changed when LoRA branches ran beside it"
    d07, d03 = np.abs(s07 - base).mean(), np.abs(s03 - base).mean()
    assert d07 > 1e-3 and d03 > 1e-3
    assert d07 > d03, (d07, d03)  # a stronger LoRA moves the video further

    # Slider moved 0.7 -> 0.4 and re-queued: no reload, and 0.3 still gives the same frames.
    entry2 = comfy_server.run(_graph(0.4, 0.3, "s43"))
    assert history_error(entry2) is None
    base2, s04, s03b = (_frames(comfy_server, entry2, n) for n in ("7", "8", "9"))
    assert np.array_equal(base2, base) and np.array_equal(s03b, s03)
    assert not np.array_equal(s04, s07)
    # Back to base only: the transformer's weights were restored exactly.
    again = comfy_server.run({"1": _loader(V5), "4": _sampler(["1", 0]), "7": _save(["4", 0], "again")})
    assert np.array_equal(_frames(comfy_server, again, "7"), base_alone)


def test_lora_for_another_model_fails_clearly(comfy_server):
    write_tiny_lora("v5", comfy_server.base / "models" / "loras" / LORA, seed=3)
    graph = {"1": _loader(V51), "2": _lora(0.7), "4": _sampler(["2", 0]), "7": _save(["4", 0], "wrong")}
    err = history_error(comfy_server.run(graph))
    assert err is not None and "does not fit" in err and "T5" in err, err


def test_save_merged_model_reloads_and_matches_the_applied_lora(comfy_server):
    write_tiny_lora("v5", comfy_server.base / "models" / "loras" / LORA, seed=3)
    merged_name = "tiny-v5-merged-host"
    graph = {
        "1": _loader(V5), "2": _lora(0.7),
        "3": {"class_type": "EasyAnimateReward_SaveMerged", "inputs": {"model": ["2", 0], "name": merged_name}},
        "4": _sampler(["2", 0]), "7": _save(["4", 0], "applied"),
    }
    entry = comfy_server.run(graph)
    assert history_error(entry) is None, history_error(entry)
    folder = comfy_server.base / "models" / "EasyAnimate" / merged_name
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not folder.with_name(merged_name + ".partial").exists()
    applied = _frames(comfy_server, entry, "7")
    # The saved folder is a complete model: the loader lists it, and it samples what the LoRA did.
    merged = comfy_server.run({"1": _loader(merged_name), "4": _sampler(["1", 0]), "7": _save(["4", 0], "merged")})
    assert history_error(merged) is None, history_error(merged)
    # Same weights (the merge is what fused patching computes), same frames: 0 difference measured.
    assert np.array_equal(_frames(comfy_server, merged, "7"), applied)

    # Saving again under the same name, or a name that leaves the models folder, is refused.
    for bad, message in ((merged_name, "already exists; choose another name"),
                         ("../escaped", "must be a plain name inside"), ("a/b", "must be a plain name inside")):
        graph["3"]["inputs"]["name"] = bad
        err = history_error(comfy_server.run(graph))
        assert err is not None and message in err, (bad, err)
    assert not (comfy_server.base / "models" / "escaped").exists()
