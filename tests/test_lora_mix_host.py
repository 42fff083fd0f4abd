"""The Mix LoRAs node on the real host: writes the exact mix into models/loras, never replaces a file."""

import torch

from easyanimate_reward.easyanimate.lora_format import load_lora_file
from easyanimate_reward.easyanimate.lora_mix import delta
from easyanimate_reward.easyanimate.tiny import build_tiny_transformer
from easyanimate_reward.tools.workflows import write_tiny_lora
from host import history_error

V5 = "tiny-EasyAnimateV5-zh-InP"


def _graph(name, rank=0):
    return {
        "1": {"class_type": "EasyAnimateReward_ModelLoader",
              "inputs": {"model": V5, "precision": "fp32", "gpu_memory_mode": "none"}},
        "2": {"class_type": "EasyAnimateReward_LoraMix",
              "inputs": {"model": ["1", 0], "lora_1": "mix-a.safetensors", "weight_1": 0.5,
                         "lora_2": "mix-b.safetensors", "weight_2": 0.25, "target_rank": rank,
                         "save_dtype": "fp32", "name": name}},
    }


def test_mix_node_writes_the_exact_mix_and_never_replaces_a_file(comfy_server):
    loras = comfy_server.base / "models" / "loras"
    a = write_tiny_lora("v5", loras / "mix-a.safetensors", seed=11)
    b = write_tiny_lora("v5", loras / "mix-b.safetensors", seed=12)
    entry = comfy_server.run(_graph("mixed-ab"))
    assert history_error(entry) is None, history_error(entry)
    assert "relative error 0" in entry["outputs"]["2"]["text"][0]
    transformer = build_tiny_transformer("v5")
    first, second = load_lora_file(a, transformer), load_lora_file(b, transformer)
    mixed = load_lora_file(loras / "mixed-ab.safetensors", transformer)
    for path, module in mixed.modules.items():
        expected = 0.5 * delta(first.modules[path]) + 0.25 * delta(second.modules[path])
        torch.testing.assert_close(delta(module), expected, rtol=1e-6, atol=1e-7)
    before = (loras / "mixed-ab.safetensors").read_bytes()
    again = comfy_server.run(_graph("mixed-ab", rank=1))
    assert "already exists" in (history_error(again) or "")
    assert (loras / "mixed-ab.safetensors").read_bytes() == before
