"""Node schemas on the real host: every input and output socket of the pack carries a tooltip, and
the scoring, ranking and sweep nodes are output nodes that show their scores on the node, so a graph
that ends in one of them runs (no "Prompt has no outputs") and its text lands in /history."""

import math

from easyanimate_reward.tools.workflows import write_tiny_lora
from host import PACK_NAME, history_error
from test_lora_host import V5, _loader

def _ours(info):
    return {name: spec for name, spec in info.items() if PACK_NAME in str(spec.get("python_module", ""))}


def test_every_input_and_output_of_every_node_has_a_tooltip(comfy_server):
    nodes = _ours(comfy_server.object_info())
    assert len(nodes) >= 12, sorted(nodes)
    missing = []
    for name, spec in sorted(nodes.items()):
        for section in ("required", "optional"):
            for input_name, input_spec in spec["input"].get(section, {}).items():
                options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
                if not str(options.get("tooltip") or "").strip():
                    missing.append(f"{name} input {input_name}")
        tooltips = spec.get("output_tooltips") or []
        for index, output_name in enumerate(spec.get("output_name") or spec["output"]):
            if index >= len(tooltips) or not str(tooltips[index] or "").strip():
                missing.append(f"{name} output {output_name}")
    assert missing == [], "sockets without a tooltip:\n" + "\n".join(missing)


def test_the_sweep_takes_the_samplers_inputs_as_the_sampler_defines_them(comfy_server):
    info = comfy_server.object_info()
    sampler = info["EasyAnimateReward_Sampler"]["input"]["required"]
    sweep = info["EasyAnimateReward_StrengthSweep"]["input"]["required"]
    shared = ("prompt", "negative_prompt", "width", "height", "frames", "steps", "cfg", "seed", "scheduler")
    for name in shared:
        assert sweep[name] == sampler[name], name  # type, default, range, step and tooltip
    order = info["EasyAnimateReward_StrengthSweep"]["input_order"]["required"]
    assert order == ["model", "lora_name", "reward", "prompt", "negative_prompt", "strengths", "width", "height",
                     "frames", "steps", "cfg", "seed", "scheduler", "mode", "batch_size"]  # saved workflows' order


def test_scoring_ranking_and_sweep_nodes_are_output_nodes(comfy_server):
    nodes = comfy_server.object_info()
    for name in ("RewardScoreFrames", "RewardRankCandidates", "StrengthSweep"):
        assert nodes["EasyAnimateReward_" + name]["output_node"] is True, name


def _reward(kind="saturation"):
    return {"class_type": "EasyAnimateReward_RewardModelLoader",
            "inputs": {"kind": kind, "device": "cpu", "dtype": "float32"}}


def _frames(count, color):
    return {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": count, "color": color}}


def _shown_text(entry, node):
    assert history_error(entry) is None, history_error(entry)
    assert entry["status"]["status_str"] == "success"
    return "\n".join(entry["outputs"][node]["text"])


def test_a_graph_ending_in_score_frames_runs_and_shows_the_scores(comfy_server):
    graph = {"1": _reward(), "2": _frames(3, 0xFF0000),
             "3": {"class_type": "EasyAnimateReward_RewardScoreFrames",
                   "inputs": {"reward": ["1", 0], "frames": ["2", 0], "prompt": "", "batch_size": 2}}}
    queued = comfy_server.queue(graph)
    assert "prompt_id" in queued, queued  # not refused with "Prompt has no outputs"
    text = _shown_text(comfy_server.wait(queued["prompt_id"]), "3")
    lines = text.splitlines()
    assert lines[0].startswith("saturation mean ") and "over 3 frames" in lines[0], text
    scores = [float(line.split(": ")[1]) for line in lines[1:]]
    assert [line.split(":")[0] for line in lines[1:]] == ["frame 0", "frame 1", "frame 2"]
    assert math.isclose(float(lines[0].split()[2]), sum(scores) / 3, abs_tol=1e-4)
    assert scores[0] > 0.5  # pure red is fully saturated


def test_a_graph_ending_in_rank_candidates_shows_the_ranking(comfy_server):
    graph = {"1": _reward(), "2": _frames(2, 0x808080), "3": _frames(2, 0xFF0000),
             "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
             "5": {"class_type": "EasyAnimateReward_RewardRankCandidates",
                   "inputs": {"reward": ["1", 0], "frames": ["4", 0], "frames_per_video": 2, "prompt": "",
                              "top_k": 1, "batch_size": 4}}}
    text = _shown_text(comfy_server.run(graph), "5")
    assert text.splitlines()[0] == "saturation, best first:"
    assert text.splitlines()[1].startswith("rank 1: video 1 score "), text  # the red video beats the grey one
    assert text.splitlines()[2].startswith("rank 2: video 0 score "), text


def test_a_graph_ending_in_the_strength_sweep_shows_the_scores(comfy_server):
    lora = "tiny-v5-sweep-shown.safetensors"
    write_tiny_lora("v5", comfy_server.base / "models" / "loras" / lora, seed=6)
    graph = {"1": _loader(V5), "2": _reward(),
             "3": {"class_type": "EasyAnimateReward_StrengthSweep",
                   "inputs": {"model": ["1", 0], "lora_name": lora, "reward": ["2", 0], "prompt": "a cat",
                              "negative_prompt": "", "strengths": "0, 0.3, 1", "width": 32, "height": 32,
                              "frames": 5, "steps": 2, "cfg": 1.0, "seed": 1, "scheduler": "auto", "mode": "fused",
                              "batch_size": 4}}}
    text = _shown_text(comfy_server.run(graph), "3")
    lines = text.splitlines()
    assert lines[0] == "saturation mean frame score by LoRA strength:"
    assert [line.split(":")[0] for line in lines[1:4]] == ["strength 0", "strength 0.3", "strength 1"]
    assert lines[4].startswith("best: strength "), text
