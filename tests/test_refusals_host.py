"""Issue 9 on the real host: bad values refused before any work (sweep strengths, cfg NaN, rank-0
LoRA, NaN reward weights), partial/shallow LoRAs through the Apply node, and an interrupt during a
strength sweep stopping before the next strength (the node run in-process on ComfyUI's modules)."""

import math
import sys

import pytest
import torch

from easyanimate_reward.tools.workflows import write_tiny_lora
from host import HOST_DIR, history_error
from test_lora_host import V5, _loader, _sampler, _save

SWEEP_LORA = "tiny-v5-sweep-refusals.safetensors"


def _sweep(strengths, cfg=6.0):
    return {"class_type": "EasyAnimateReward_StrengthSweep",
            "inputs": {"model": ["1", 0], "lora_name": SWEEP_LORA, "reward": ["2", 0], "prompt": "a cat",
                       "negative_prompt": "", "strengths": strengths, "width": 32, "height": 32, "frames": 5,
                       "steps": 2, "cfg": cfg, "seed": 1, "scheduler": "auto", "mode": "fused", "batch_size": 4}}


def _reward_loader():
    return {"class_type": "EasyAnimateReward_RewardModelLoader", "inputs": {"kind": "saturation", "device": "cpu", "dtype": "float32"}}


def _run_error(server, graph):
    entry = server.run(graph)
    return history_error(entry), entry


def test_sweep_strengths_and_cfg_are_checked_before_any_work(comfy_server):
    write_tiny_lora("v5", comfy_server.base / "models" / "loras" / SWEEP_LORA, seed=4)
    for strengths, message in (("0, nan", "'nan' is not a plain finite number"),
                               ("0 inf", "'inf' is not a plain finite number"),
                               ("1e400", "'1e400' is not a plain finite number"),
                               ("0,1_0", "'1_0' is not a plain finite number"),
                               ("0, 10.5", "outside the LoRA strength range -10..10"),
                               ("-11", "outside the LoRA strength range")):
        graph = {"1": _loader(V5), "2": _reward_loader(), "3": _sweep(strengths), "4": _save(["3", 0], "sweep")}
        err, entry = _run_error(comfy_server, graph)
        assert err is not None and message in err, (strengths, err)
    graph = {"1": _loader(V5), "2": _reward_loader(), "3": _sweep("0, 0.5", cfg=math.nan), "4": _save(["3", 0], "s")}
    err, _ = _run_error(comfy_server, graph)
    assert err is not None and "cfg (guidance scale) must be a finite number, got nan" in err, err


def test_sampler_cfg_nan_is_refused(comfy_server):
    node = _sampler(["1", 0])
    node["inputs"]["cfg"] = math.nan  # JSON NaN passes the host's min/max validation (NaN compares False)
    err, _ = _run_error(comfy_server, {"1": _loader(V5), "4": node, "7": _save(["4", 0], "cfgnan")})
    assert err is not None and "cfg (guidance scale) must be a finite number, got nan" in err, err


def test_rank_0_and_nan_loras_are_refused_by_the_apply_node(comfy_server, tmp_path):
    from test_lora import write_official
    from easyanimate_reward.easyanimate.tiny import build_tiny_transformer
    from easyanimate_reward.easyanimate.lora_format import lora_target_modules

    transformer = build_tiny_transformer("v5")
    tensors = {p: (torch.randn(2, m.in_features) * 0.1, torch.randn(m.out_features, 2) * 0.1)
               for p, m in lora_target_modules(transformer).items()}
    first = next(iter(tensors))
    loras = comfy_server.base / "models" / "loras"
    cases = {"rank0.safetensors": ({**tensors, first: (tensors[first][0][:0], tensors[first][1][:, :0])}, 2.0,
                                   "has rank 0"),
             "nanalpha.safetensors": (tensors, math.nan, "alpha nan"),
             "nanup.safetensors": ({**tensors, first: (tensors[first][0], tensors[first][1] * math.nan)}, 2.0,
                                   "NaN/inf values in its up tensor")}
    for name, (lora, alpha, message) in cases.items():
        write_official(loras / name, lora, alpha=alpha)
    for name, (_, _, message) in cases.items():
        apply = {"class_type": "EasyAnimateReward_LoraApply",
                 "inputs": {"model": ["1", 0], "lora_name": name, "strength": 0.7, "mode": "fused"}}
        err, _ = _run_error(comfy_server, {"1": _loader(V5), "2": apply, "4": _sampler(["2", 0]),
                                           "7": _save(["4", 0], "bad")})
        assert err is not None and message in err and name in err, (name, err)


def test_reward_weight_nan_is_refused_by_combine(comfy_server):
    graph = {"1": _reward_loader(),
             "2": {"class_type": "EasyAnimateReward_RewardCombine",
                   "inputs": {"reward_1": ["1", 0], "weight_1": 1.0, "reward_2": ["1", 0], "weight_2": math.nan,
                              "weight_3": 1.0, "weight_4": 1.0}},
             "3": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 0}},
             "4": {"class_type": "EasyAnimateReward_RewardScoreFrames",
                   "inputs": {"reward": ["2", 0], "frames": ["3", 0], "prompt": "", "batch_size": 2}},
             "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}}
    err, _ = _run_error(comfy_server, graph)
    assert err is not None and "reward weight nan" in err and "must be a finite number" in err, err


# ---------------------------------------------------------------------------------------------- item 5


@pytest.fixture(scope="module")
def host_modules(tmp_path_factory):
    sys.path.insert(0, str(HOST_DIR))
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths

    base = tmp_path_factory.mktemp("sweep_models")
    folder_paths.models_dir = str(base)
    folder_paths.add_model_folder_path("loras", str(base / "loras"), is_default=True)
    from easyanimate_reward.nodes import sweep_nodes

    yield sweep_nodes, base
    sys.path.remove(str(HOST_DIR))


def test_interrupt_during_a_sweep_stops_before_the_next_strength(host_modules, tiny_models):
    from easyanimate_reward.easyanimate.cancel import cancel_check
    from easyanimate_reward.easyanimate.loading import load_pipe
    from easyanimate_reward.easyanimate.model import EasyAnimateModel
    from easyanimate_reward.easyanimate import sampling
    from easyanimate_reward.reward.simple import SaturationReward

    sweep_nodes, base = host_modules
    write_tiny_lora("v5", base / "loras" / SWEEP_LORA, seed=4)
    model = EasyAnimateModel(load_pipe(tiny_models["v5"], "fp32", "none"))
    videos = []
    original = sampling.sample_video

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        videos.append(1)
        requested.append(True)  # Cancel pressed while the first strength's video was sampled
        return out

    requested = []

    class Stop(Exception):
        pass

    def check():
        if requested:
            raise Stop()

    from easyanimate_reward.easyanimate import sweep  # the node's loop lives in the core

    sweep.sample_video = counting
    try:
        with cancel_check(check), pytest.raises(Stop):
            sweep_nodes.EasyAnimateStrengthSweep.execute(
                model, SWEEP_LORA, SaturationReward(), "a cat", "", "0, 0.5, 1", 32, 32, 5, 2, 6.0, 1, "auto",
                "fused", 4)
    finally:
        sweep.sample_video = original
    assert len(videos) == 1, f"{len(videos)} strengths were sampled after the interrupt"
