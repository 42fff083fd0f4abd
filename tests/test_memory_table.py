"""Memory: the simulated table follows the pack's own functions, the pre-flight check refuses a
request that cannot fit before anything is allocated (also on the real host), and the training
memory options (activation offload, 8-bit AdamW, prompt embeddings on disk) work and stay exact."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from easyanimate_reward.easyanimate import preflight, sampling
from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video
from easyanimate_reward.reward.simple import ColorfulnessReward
from easyanimate_reward.training import memory_options, trainer as trainer_module
from easyanimate_reward.training.config import TrainConfig
from easyanimate_reward.training.rollout import PromptBank
from easyanimate_reward.training.trainer import RewardLoRATrainer
from test_training import tiny_config as training_tiny_config

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a cat playing piano in a sunny room"


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {v: load_pipe(tiny_models[v], "fp32", "none") for v in ("v5", "v5.1")}


def tiny_config(**overrides) -> TrainConfig:
    """test_training's tiny run, one training step."""
    return training_tiny_config(**{"train_steps": 1, **overrides})


# ---- the simulated table ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def memory_table():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import memory_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return memory_table


def test_the_simulated_training_row_runs_the_trainers_own_step(memory_table):
    """The training rows of the table run the trainer's own rollout, reward and update under fake
    tensors (a change to the trainer that the simulation cannot follow shows up here, not as a
    table of errors): a real-width 12b block, a small video."""
    row, = memory_table.simulate_training("V5.1-12b", memory_table.TRAIN_VARIANTS[:1], (64, 64, 5), num_layers=1,
                                          log=lambda *_: None)
    assert row["error"] is None, row["error"]
    assert row["lora"] > 0 and row["state"] > row["lora"] and row["activations"] > 0


def test_simulated_figures_follow_vae_tiling_and_memory_mode(memory_table):
    """Real-size Magvit decode through sampling.decode_latents, tiled and untiled, and the real
    12b transformer quantised by the pack's own qfloat8 mode: switching either changes the cells."""
    m = memory_table
    size = (384, 672, 5)
    vae_phases = m.simulate_vae([size], log=lambda *_: None)
    untiled, tiled = vae_phases[("decode", False, *size)], vae_phases[("decode", True, *size)]
    assert untiled.activations > 1.5 * tiled.activations > 0

    with m.fake_mode():
        parts = {"transformer": m.build_transformer("V5.1-12b"), "vae": m.build_vae(), "text_encoder": None,
                 "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}
    bf16 = m.module_bytes(parts["transformer"])
    assert 21.5 * m.GIB < bf16 < 22.5 * m.GIB  # the 12b transformer in bf16
    with m.fake_mode():
        m.make_pipe("V5.1-12b", "model_cpu_offload_and_qfloat8", parts)  # ModulePlacement.prepare quantises
    fp8 = m.module_bytes(parts["transformer"])
    assert 0.45 * bf16 < fp8 < 0.6 * bf16

    weights = m.Weights(transformer=bf16, transformer_fp8=fp8, vae=m.module_bytes(parts["vae"]), text=15 * m.GIB,
                        text_largest=15 * m.GIB, leaf={"text": m.GIB, "transformer": m.GIB // 8, "vae": m.GIB // 64})
    phases = {"text": m.Phase(m.GIB, 0), ("denoise", *size): m.Phase(m.GIB // 2, 0)}
    cells = {(mode, tiled): m.cell(mode, weights, phases, vae_phases, size, tiled)["vram"]
             for mode in m.memory_modes() if mode in ("none", "model_cpu_offload", "model_cpu_offload_and_qfloat8",
                                                      "sequential_cpu_offload") for tiled in (False, True)}
    assert cells[("none", False)] > cells[("model_cpu_offload", False)] > cells[("model_cpu_offload_and_qfloat8", False)]
    assert cells[("sequential_cpu_offload", False)] > cells[("sequential_cpu_offload", True)]


def test_fused_attention_is_counted_without_a_score_matrix(memory_table):
    """A 2-layer 12b-wide transformer step at 384x672x9: no allocation reaches tokens x tokens."""
    m = memory_table
    m.TRANSFORMERS["_test"] = dict(m.TRANSFORMERS["V5.1-12b"], num_layers=2, mmdit_layers=2)
    m.VERSIONS["_test"] = "v5.1"
    try:
        with m.fake_mode():
            parts = {"transformer": m.build_transformer("_test"), "vae": torch.nn.Linear(1, 1),
                     "text_encoder": None, "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}
            pipe = m.make_pipe("_test", "none", parts)
            phase = m.phase_denoise(pipe, 384, 672, 9)
    finally:
        del m.TRANSFORMERS["_test"], m.VERSIONS["_test"]
    assert "fused (no tokens x tokens matrix)" in m.attention_check(phase, 384, 672, 9)
    assert 0 < phase.activations < 2 * m.GIB


# ---- pre-flight -------------------------------------------------------------------------------------

def test_preflight_refuses_before_allocating(pipes, monkeypatch):
    pipe = pipes["v5.1"]
    model = EasyAnimateModel(pipe)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the request was not refused before encoding")

    monkeypatch.setattr(sampling, "encode_request_prompts", must_not_run)
    monkeypatch.setenv(preflight.BUDGET_ENV, "0.5")
    request = SampleRequest(PROMPT, width=768, height=768, frames=145, steps=2, start_image=torch.rand(3, 64, 64))
    with pytest.raises(preflight.MemoryPreflightError) as info:
        sample_video(model, request)
    message = str(info.value)
    assert "768x768x145 image-to-video" in message and "'none'" in message and "Would fit:" in message
    assert preflight.BUDGET_ENV in message
    # the size it proposes does pass the same check
    proposal = message.split("Would fit: ")[1].split(" frames")[0]
    w, h, f = (int(x) for x in proposal.split("x"))
    preflight.check_sampling(pipe, w, h, f, 1, request.guidance_scale, True)
    # without the cap, a small request passes
    monkeypatch.delenv(preflight.BUDGET_ENV)
    preflight.check_sampling(pipe, 32, 32, 5, 1, 6.0, True)


def test_preflight_estimates_grow_with_the_request_and_know_the_vae_tiles(pipes):
    pipe = pipes["v5.1"]
    small = max(p.total for p in preflight.estimate_sampling(pipe, 256, 256, 9))
    large = max(p.total for p in preflight.estimate_sampling(pipe, 768, 768, 49))
    assert large > 8 * small
    vae = pipe.vae
    untiled = preflight.decode_activations(vae, 768, 768, 49)
    vae.enable_tiling(tile_sample_min_height=256, tile_sample_min_width=256)
    try:
        tiled = preflight.decode_activations(vae, 768, 768, 49)
    finally:
        vae.disable_tiling()
    assert tiled < untiled


def test_preflight_matches_the_simulation_calibration():
    """The closed-form decode/encode/denoise formulas reproduce the simulated 12b figures
    (benchmarks/memory_table.py, real configs under fake tensors) within 10%."""
    from types import SimpleNamespace

    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512]), parameters=lambda: iter(()))
    simulated_decode = {(384, 672, 25): 4.75, (576, 1008, 49): 10.78, (768, 1344, 49): 19.17}
    for (h, w, f), gib in simulated_decode.items():
        assert preflight.decode_activations(vae, w, h, f) / preflight.GIB == pytest.approx(gib, rel=0.10)
    transformer = SimpleNamespace(config=SimpleNamespace(num_attention_heads=48, attention_head_dim=64, patch_size=2),
                                  parameters=lambda: iter(()))
    simulated_denoise = {(384, 672, 25): 1.01, (576, 1008, 25): 2.23, (576, 1008, 49): 4.12, (768, 1344, 49): 7.29}
    for (h, w, f), gib in simulated_denoise.items():
        assert preflight.denoise_activations(transformer, w, h, f, 2) / preflight.GIB == pytest.approx(gib, rel=0.10)
    simulated_encode = {(384, 672, 25): 2.92, (576, 1008, 25): 6.56}
    for (h, w, f), gib in simulated_encode.items():
        assert preflight.encode_activations(vae, w, h, f) / preflight.GIB == pytest.approx(gib, rel=0.10)


def test_training_preflight_refuses_with_the_options_that_help(pipes, monkeypatch):
    monkeypatch.setenv(preflight.BUDGET_ENV, "0.0001")
    config = tiny_config()
    trainer = RewardLoRATrainer(EasyAnimateModel(pipes["v5.1"]), ColorfulnessReward(), [PROMPT], config)
    with pytest.raises(preflight.MemoryPreflightError, match="not enough memory to train") as info:
        trainer.train()
    assert "optimizer 'adamw_8bit'" in str(info.value) and "gradient_checkpointing on" in str(info.value)
    assert trainer.lora is None  # refused before the LoRA was built


def test_host_refuses_an_oversized_request_and_keeps_serving(tiny_models, tmp_path):
    """The real ComfyUI server with a 2 GB budget: 768x768x145 image-to-video fails with the
    pre-flight message in /history; the next (small) request runs."""
    from host import ComfyServer, history_error, install_models

    from easyanimate_reward.easyanimate.tiny import TINY_NAMES
    from easyanimate_reward.tools import workflows

    server = ComfyServer(tmp_path / "base")
    server.prepare_base()
    install_models(server.base, {TINY_NAMES[v]: p for v, p in tiny_models.items()})
    workflows.install_tiny_assets(server.base, workflows.load_api("02_image_to_video"))
    previous = os.environ.get(preflight.BUDGET_ENV)
    os.environ[preflight.BUDGET_ENV] = "2"
    try:
        server.start()
    finally:
        if previous is None:
            del os.environ[preflight.BUDGET_ENV]
        else:
            os.environ[preflight.BUDGET_ENV] = previous
    try:
        graph = workflows.tinyfy(workflows.load_api("02_image_to_video"), TINY_NAMES, workflows.TINY_LORAS)
        sampler = next(n for n in graph.values() if n["class_type"] == "EasyAnimateReward_Sampler")
        small = dict(sampler["inputs"])
        sampler["inputs"].update(width=768, height=768, frames=145)
        entry = server.run(graph, timeout=300)
        error = history_error(entry)
        assert error is not None and "MemoryPreflightError" in error, (error, server.log_tail(3000))
        assert "768x768x145 image-to-video" in error and "Would fit" in error
        sampler["inputs"].update(small)
        entry = server.run(graph, timeout=300)
        assert history_error(entry) is None, server.log_tail(3000)
    finally:
        server.stop()


# ---- training memory options ------------------------------------------------------------------------

def test_activation_offload_saves_tensors_through_save_on_cpu_and_keeps_gradients(pipes, monkeypatch):
    """The trainer enters the offload context around rollout + reward; with it, every tensor saved for
    backward passes through it, and the trained LoRA equals the one trained without it."""
    assert isinstance(memory_options.activation_offload(tiny_config(activation_offload=True), "cuda"),
                      torch.autograd.graph.save_on_cpu)
    assert not isinstance(memory_options.activation_offload(tiny_config(), "cuda"),
                          torch.autograd.graph.saved_tensors_hooks)
    packed = []

    class CountingOffload(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self):
            super().__init__(lambda t: packed.append(t.numel()) or t.clone(), lambda t: t)

    real = memory_options.activation_offload
    monkeypatch.setattr(trainer_module, "activation_offload",
                        lambda cfg, device: CountingOffload() if cfg.activation_offload else real(cfg, device))

    def train(**options):
        t = RewardLoRATrainer(EasyAnimateModel(pipes["v5.1"]), ColorfulnessReward(), [PROMPT],
                              tiny_config(train_steps=1, **options))
        t.train()
        return {n: p.detach().clone() for n, p in t.lora.named_factors()}

    plain = train()
    assert not packed
    offloaded = train(activation_offload=True)
    assert sum(packed) > 0
    assert all(torch.equal(plain[n], offloaded[n]) for n in plain)


def test_8bit_adamw_trains_and_resumes_exactly(pipes, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in requirements.txt")
    pipe = pipes["v5.1"]
    config = tiny_config(train_steps=2, rank=128, alpha=64.0, optimizer="adamw_8bit", cfg=1.0,
                         learning_rate=3e-2, sampling_steps=2, backprop="last")
    half = tiny_config(**{**config.to_dict(), "train_steps": 1})

    def trainer(cfg, out, resume=None):
        return RewardLoRATrainer(EasyAnimateModel(pipe), ColorfulnessReward(), [PROMPT, "a dog"], cfg,
                                 output_path=out, resume_from=resume)

    whole = trainer(config, tmp_path / "whole.safetensors")
    whole.train()
    assert type(whole.optimizer).__name__ == "AdamW8bit"
    states = list(whole.optimizer.state.values())
    assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in states)
    out = tmp_path / "halves.safetensors"
    trainer(half, out).train()
    resumed = trainer(config, out, resume=out)
    resumed.train()
    expected = {n: p.detach() for n, p in whole.lora.named_factors()}
    actual = {n: p.detach() for n, p in resumed.lora.named_factors()}
    assert all(torch.equal(expected[n], actual[n]) for n in expected)
    # different from plain AdamW: the option really switches the optimizer
    plain = trainer(tiny_config(**{**config.to_dict(), "optimizer": "adamw"}), tmp_path / "plain.safetensors")
    plain.train()
    gap = max((expected[n] - p.detach()).abs().max().item() for n, p in plain.lora.named_factors())
    assert gap > 0


def test_8bit_adamw_without_bitsandbytes_gives_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    param = torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(RuntimeError, match="needs bitsandbytes.*pip install bitsandbytes.*'adamw'"):
        memory_options.make_optimizer(tiny_config(optimizer="adamw_8bit"), [param])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        tiny_config(optimizer="sgd").validate()


def test_prompt_embeddings_of_a_large_prompt_file_go_to_disk(pipes):
    pipe = pipes["v5"]  # Bert + T5: both embeddings go through the store
    prompts = [f"a cat number {i} playing piano" for i in range(7)]
    in_ram = PromptBank(pipe, prompts, "")
    on_disk = PromptBank(pipe, prompts, "", chunk=3, ram_limit=4)
    assert not in_ram.store.on_disk and in_ram.store.resident_bytes() > 0
    assert on_disk.store.on_disk and on_disk.store.resident_bytes() == 0
    folder = on_disk.store.folder
    assert len(list(folder.glob("*.safetensors"))) == 3  # 8 unique prompts (with "") in chunks of 3
    batch = [prompts[5], prompts[0], ""]
    a, b = in_ram.cond(batch), on_disk.cond(batch)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.embeds_t5, b.embeds_t5)
    on_disk.store.close()
    assert not folder.exists()
