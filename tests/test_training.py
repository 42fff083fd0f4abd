"""Reward backprop on tiny models: truncated gradients against independent autograd references,
LoRA-only gradients, reward going up, checkpoints surviving interrupts and NaNs, exact resume with
the optimizer state, the best held-out checkpoint, prompts, CLI."""

import contextlib
import json
import math
import random

import diffusers
import pytest
import torch

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.lora_format import load_lora_file
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.text import encode_prompts
from easyanimate_reward.reward.base import Reward
from easyanimate_reward.reward.simple import ColorfulnessReward, SaturationReward
from easyanimate_reward.training.checkpoint import (
    NonFiniteWeightsError,
    TrainingState,
    load_checkpoint,
    read_training_state,
    save_checkpoint,
    save_training_state,
)
from easyanimate_reward.training.config import TrainConfig, parse_step_list, select_grad_steps
from easyanimate_reward.training.lora_layers import LoraLayers
from easyanimate_reward.training.prompts import NoPromptsError, load_prompts
from easyanimate_reward.training.run_layout import RunLayout
from easyanimate_reward.training.rollout import (
    PromptBank,
    RolloutSettings,
    cache_safe_checkpoint,
    enable_gradient_checkpointing,
    pick_frames,
    rollout_video,
    sampled_frame_indices,
    video_rewards,
)
from easyanimate_reward.training.trainer import RewardLoRATrainer, TrainingDivergedError, history_plot

def run_json(lora_path) -> dict:
    """run.json of the run whose LoRA is `lora_path` (the CLI's default layout)."""
    return json.loads(RunLayout.for_lora_file(lora_path).run_json.read_text())


def state_file(lora_path):
    return RunLayout.for_lora_file(lora_path).state


def best_path(lora_path):
    return RunLayout.for_lora_file(lora_path).best


SETTINGS = RolloutSettings(width=32, height=32, frames=5, sampling_steps=4, guidance_scale=4.0)
PROMPT = "a cat playing piano in a sunny room"


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {v: load_pipe(tiny_models[v], "fp32", "none") for v in ("v5", "v5.1")}


def tiny_config(**overrides) -> TrainConfig:
    base = dict(width=32, height=32, frames=5, sampling_steps=3, cfg=4.0, rank=4, alpha=4.0,
                learning_rate=1e-2, weight_decay=0.0, max_grad_norm=1.0, save_every=0, seed=0, backprop="tail",
                backprop_k=2, gradient_checkpointing=False)
    base.update(overrides)
    return TrainConfig(**base)


def random_lora(pipe, seed=0) -> LoraLayers:
    """LoRA layers with a non-zero up matrix, so that both factors get gradients."""
    lora = LoraLayers(pipe.transformer, rank=4, alpha=4.0, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for up in lora.up:
            up.copy_(torch.randn(up.shape, generator=generator) * 0.05)
    return lora


@contextlib.contextmanager
def attached(lora, pipe):
    lora.attach(pipe.transformer)
    try:
        yield lora
    finally:
        lora.detach()


def lora_grads(lora) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in lora.parameters()]


def truncated_loss(pipe, lora, grad_steps, detach_input=False, reward=None):
    bank = PromptBank(pipe, [PROMPT])
    video = rollout_video(pipe, SETTINGS, bank.cond([PROMPT]), bank.uncond(1), [7], grad_steps, detach_input)
    return -video_rewards(reward or ColorfulnessReward(), video, [PROMPT], 1).mean()


def reference_loss(pipe, first_grad_step: int):
    """Independent of the pack's sampler: a plain diffusers loop, CFG written out, VAE called
    directly. Steps before `first_grad_step` run entirely under no_grad."""
    cond, uncond = encode_prompts(pipe, [PROMPT]), encode_prompts(pipe, [""])
    scheduler = getattr(diffusers, pipe.scheduler_config["_class_name"]).from_config(pipe.scheduler_config)
    scheduler.set_timesteps(SETTINGS.sampling_steps)
    shape = (16, 2, 4, 4)  # 5 frames -> 2 latents, 32 px -> 4
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(7))[None]
    inpaint = torch.zeros(2, 17, 2, 4, 4)
    text = torch.cat([uncond.embeds, cond.embeds])
    text_t5 = None if cond.embeds_t5 is None else torch.cat([uncond.embeds_t5, cond.embeds_t5])
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad() if i < first_grad_step else contextlib.nullcontext():
            out = pipe.transformer(torch.cat([latents, latents]), t.expand(2).float(), encoder_hidden_states=text,
                                   encoder_hidden_states_t5=text_t5, inpaint_latents=inpaint, return_dict=False)[0]
            uncond_out, cond_out = out.chunk(2)
            noise = uncond_out + SETTINGS.guidance_scale * (cond_out - uncond_out)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    vae = pipe.vae
    video = vae.decode(latents[:, :, :1] / vae.config.scaling_factor, return_dict=False)[0]
    frames = (video / 2 + 0.5).clamp(0, 1)[:, :, 0]
    return -ColorfulnessReward()(frames).mean()


def assert_grads_close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("version", ["v5", "v5.1"])
def test_truncated_gradients_match_autograd_references(pipes, version):
    pipe = pipes[version]
    lora = random_lora(pipe)
    total = SETTINGS.sampling_steps
    with attached(lora, pipe):
        results = {}
        for name, steps, first in (("all", list(range(total)), 0), ("last", [total - 1], total - 1)):
            lora.zero_grad()
            loss = truncated_loss(pipe, lora, steps)
            loss.backward()
            results[name] = lora_grads(lora)
            lora.zero_grad()
            ref = reference_loss(pipe, first)
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
            ref.backward()
            assert_grads_close(results[name], lora_grads(lora))
        if version == "v5":  # gradient checkpointing (transformer and VAE) changes nothing
            restore = enable_gradient_checkpointing(pipe)
            try:
                assert pipe.transformer.is_gradient_checkpointing and pipe.vae.is_gradient_checkpointing
                lora.zero_grad()
                truncated_loss(pipe, lora, list(range(total))).backward()
            finally:
                restore()
            assert not pipe.transformer.is_gradient_checkpointing
            assert_grads_close(lora_grads(lora), results["all"])
    # The truncation matters: last-step-only gradients differ from full backprop.
    diff = max((a - b).abs().max().item() for a, b in zip(results["all"], results["last"]))
    assert diff > 1e-6
    assert any(g.abs().sum() > 0 for g in results["last"])


def test_only_lora_parameters_get_gradients_and_no_graph_on_skipped_steps(pipes):
    pipe = pipes["v5"]
    lora = random_lora(pipe, seed=3)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((torch.is_grad_enabled(), args[0].requires_grad)), with_kwargs=True)
    reward = SaturationReward()
    try:
        with attached(lora, pipe):
            truncated_loss(pipe, lora, [2, 3], reward=reward).backward()
            first = list(calls)
            calls.clear()
            truncated_loss(pipe, lora, [2, 3], detach_input=True, reward=reward)
    finally:
        hook.remove()
    # Steps 0 and 1 ran without autograd; 2 and 3 with it; step 3's input carries step 2's graph.
    assert [g for g, _ in first] == [False, False, True, True]
    assert first[3][1] is True
    # DRTune: the transformer input of the kept steps is cut from the earlier chain.
    assert [r for _, r in calls] == [False, False, False, False]
    frozen = [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, reward]
    assert all(p.grad is None and not p.requires_grad for m in frozen for p in m.parameters())
    grads = [p.grad for p in lora.parameters()]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.parameters())
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2


def test_vae_checkpointing_is_exact_and_leaves_no_cache(pipes):
    """diffusers' plain checkpointing of the Magvit VAE fails on the second decode (its feature
    cache is refilled by the recomputation); the cache-safe one matches plain autograd."""
    vae = pipes["v5"].vae
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def decode_and_grad():
        z = latents.clone().requires_grad_(True)
        video = vae.decode(z, return_dict=False)[0]
        (video.square() * torch.linspace(0, 1, 32)).mean().backward()
        return video.detach(), z.grad

    reference = decode_and_grad()
    vae.enable_gradient_checkpointing(gradient_checkpointing_func=cache_safe_checkpoint)
    try:
        for _ in range(2):  # the second run would see a polluted cache
            video, grad = decode_and_grad()
            assert video.shape == (1, 3, 9, 32, 32)
            torch.testing.assert_close(video, reference[0])
            torch.testing.assert_close(grad, reference[1], rtol=1e-5, atol=1e-7)
            assert all(getattr(m, "prev_features", None) is None for m in vae.modules())
    finally:
        vae.disable_gradient_checkpointing()


def test_grad_step_strategies():
    assert select_grad_steps("last", 10) == [9]
    assert select_grad_steps("tail", 10, k=3) == [7, 8, 9]
    assert select_grad_steps("spread", 10, k=4) == [0, 3, 6, 9]
    assert select_grad_steps("all", 4) == [0, 1, 2, 3]
    assert select_grad_steps("list", 10, step_list="0, 5 -1") == [0, 5, 9]
    drawn = select_grad_steps("random", 50, k=5, start=10, end=19, rng=random.Random(1))
    assert len(drawn) == 5 and all(10 <= s <= 19 for s in drawn)
    assert select_grad_steps("random", 50, k=5, start=-5, rng=random.Random(2)) == [45, 46, 47, 48, 49]
    with pytest.raises(ValueError, match="outside"):
        parse_step_list("3, 12", 10)
    with pytest.raises(ValueError, match="num_sampled_frames"):
        tiny_config(num_sampled_frames=2, num_decoded_latents=1).validate()
    assert sampled_frame_indices(9, 3) == [0, 4, 8]
    video = torch.arange(2 * 3 * 9, dtype=torch.float32).view(2, 3, 9, 1, 1).expand(2, 3, 9, 2, 2)
    frames = pick_frames(video, 3)
    assert frames.shape == (6, 3, 2, 2) and frames[1, 0, 0, 0] == 4 and frames[3, 0, 0, 0] == 27


def test_prompt_sources(tmp_path):
    assert load_prompts("a cat\n\n  a dog  \n# comment") == ["a cat", "a dog"]
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n\n{"prompt": "y", "id": 2}\n')
    assert load_prompts("p.txt", [tmp_path]) == ["one", "two"]
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["x", "y"]
    (tmp_path / "empty.txt").write_text("\n \n")
    for source in ("", "  \n", str(tmp_path / "empty.txt")):
        with pytest.raises(NoPromptsError, match="no prompts"):
            load_prompts(source)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts("missing.jsonl", [tmp_path])
    with pytest.raises(ValueError, match="no training prompts"):
        RewardLoRATrainer(None, SaturationReward(), [], tiny_config())


def test_training_raises_the_reward_on_fixed_seeds(pipes, tmp_path):
    """Held-out reward (fixed seeds, no grad) before vs after a few steps on a weight-free reward."""
    pipe = pipes["v5"]
    config = tiny_config(train_steps=6, learning_rate=5e-2, eval_every=6, backprop="all", cfg=1.0)
    out = tmp_path / "sat.safetensors"
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT], config, output_path=out,
                                eval_prompts=[PROMPT, "a dog running on the beach at sunset"])
    result = trainer.train()
    before, after = result.state.history["eval_reward"]
    assert result.state.history["eval_step"] == [0, 6]
    assert after > before + 0.05, result.state.history
    rewards = result.state.history["reward"]
    assert sum(rewards[-3:]) > sum(rewards[:3]) + 0.1, rewards  # training reward rises too
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert not pipe.transformer.is_gradient_checkpointing
    # The file is the official format and reloads with the trained weights (bf16 on disk).
    weights = load_lora_file(out, pipe.transformer)
    assert set(weights.modules) == set(trainer.lora.paths)
    path0 = trainer.lora.paths[0]
    torch.testing.assert_close(weights.modules[path0].up.float(), trainer.lora.up[0].detach(), rtol=1e-2, atol=1e-4)
    sidecar = run_json(out)
    assert sidecar["step"] == 6 and len(sidecar["history"]["reward"]) == 6
    assert sidecar["config"]["learning_rate"] == 5e-2 and sidecar["stop_reason"] == "finished"
    assert history_plot(result.state.history).shape[-1] == 3


class StopNow(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


def test_interrupt_keeps_the_last_good_checkpoint_and_resume_continues(pipes, tmp_path):
    pipe = pipes["v5.1"]
    out = tmp_path / "run.safetensors"
    config = tiny_config(train_steps=4, save_every=1, cfg=1.0, sampling_steps=2, backprop="auto")
    calls = {"n": 0}

    def check_interrupt():
        calls["n"] += 1
        if calls["n"] == 5:  # 2 sampling steps per rollout: the 3rd step's rollout is cut short
            raise StopNow()

    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), ColorfulnessReward(), [PROMPT, "a dog"], config,
                                output_path=out, check_interrupt=check_interrupt)
    with pytest.raises(StopNow):
        trainer.train()
    assert not trainer.lora.attached
    weights, state = load_checkpoint(out, pipe.transformer)
    assert state.step == 2 and len(state.history["loss"]) == 2
    assert "interrupted" in run_json(out)["stop_reason"]
    torch.testing.assert_close(weights.modules[trainer.lora.paths[-1]].up.float(),
                               trainer.lora.up[-1].detach(), rtol=1e-2, atol=1e-4)

    resumed = RewardLoRATrainer(EasyAnimateModel(pipe), ColorfulnessReward(), [PROMPT, "a dog"], config,
                                output_path=out, resume_from=out)
    result = resumed.train()
    assert result.state.step == 4 and result.state.history["step"] == [1, 2, 3, 4]
    assert result.state.history["loss"][:2] == state.history["loss"]


class NanAfter(Reward):
    name = "nan_after"

    def __init__(self, good_calls: int):
        super().__init__()
        self.good_calls, self.calls = good_calls, 0

    def score(self, frames, prompts):
        self.calls += 1
        value = SaturationReward()(frames)
        return value * float("nan") if self.calls > self.good_calls else value


def test_nan_loss_stops_and_keeps_finite_checkpoint(pipes, tmp_path):
    pipe = pipes["v5"]
    out = tmp_path / "nan.safetensors"
    config = tiny_config(train_steps=5, save_every=1, cfg=1.0, sampling_steps=2, backprop="last")
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), NanAfter(2), [PROMPT], config, output_path=out)
    with pytest.raises(TrainingDivergedError, match="nan.safetensors"):
        trainer.train()
    weights, state = load_checkpoint(out, pipe.transformer)
    assert state.step == 2
    assert all(torch.isfinite(m.up).all() and torch.isfinite(m.down).all() for m in weights.modules.values())
    # NaN weights never overwrite a good file.
    before = out.read_bytes()
    with torch.no_grad():
        trainer.lora.up[0].fill_(float("nan"))
    layout = RunLayout.for_lora_file(out)
    with pytest.raises(NonFiniteWeightsError):
        save_checkpoint(layout, trainer.lora.to_weights(), TrainingState(step=3), trainer.run_id)
    assert out.read_bytes() == before
    # The training state in the run folder is the step-2 one; NaN moments are never written, and the
    # stale file goes (it would not match the LoRA that a finite-weight save writes next).
    assert read_training_state(layout)[1] == 2
    assert save_training_state(layout, {"x.down.exp_avg": torch.tensor([float("nan")])}, 3, trainer.run_id) is None
    assert not layout.state.exists()


def test_bf16_and_float8_bases_train_float32_lora(tiny_models):
    pipe = load_pipe(tiny_models["v5"], "bf16", "model_cpu_offload_and_qfloat8")
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    lora = random_lora(pipe)
    settings = RolloutSettings(32, 32, 5, 2, 1.0)
    bank = PromptBank(pipe, [PROMPT])
    with attached(lora, pipe):
        video = rollout_video(pipe, settings, bank.cond([PROMPT]), None, [1], [1])
        (-video_rewards(SaturationReward(), video, [PROMPT], 1).mean()).backward()
    grads = [p.grad for p in lora.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_early_stop_on_held_out_and_cli(pipes, tiny_models, tmp_path):
    from easyanimate_reward.training.__main__ import main

    pipe = pipes["v5"]
    config = tiny_config(train_steps=5, learning_rate=1e-30, eval_every=1, early_stop_patience=1,
                         cfg=1.0, sampling_steps=2)
    result = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT], config,
                               eval_prompts=["a dog"]).train()
    assert result.stop_reason == "early stop" and result.state.step == 1
    # The negligible update did not beat the baseline: the best is step 0 (no output path, no file).
    assert result.best_step == 0 and result.best_path is None
    assert result.best_eval_reward == result.state.history["eval_reward"][0]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    out = tmp_path / "cli" / "lora.safetensors"
    code = main(["--model", str(tiny_models["v5.1"]), "--reward", "saturation + 0.01*colorfulness",
                 "--prompts", str(prompts), "--lora-name", str(out), "--precision", "fp32", "--memory-mode", "none",
                 "--width", "32", "--height", "32", "--frames", "5", "--sampling-steps", "2", "--rank", "2",
                 "--alpha", "2", "--train-steps", "2", "--backprop", "uniform", "--backprop-k", "2",
                 "--target-modules", r"attn1\.to_(q|v)$", "--no-gradient-checkpointing"])
    assert code == 0
    weights = load_lora_file(out, pipes["v5.1"].transformer)
    assert weights.ranks == {2} and all(p.endswith(("to_q", "to_v")) for p in weights.modules)
    assert run_json(out)["step"] == 2


def test_sequential_offload_is_refused_with_a_clear_error(pipes):
    import dataclasses

    from easyanimate_reward.easyanimate.memory import ModulePlacement

    pipe = dataclasses.replace(pipes["v5"], placement=ModulePlacement("sequential_cpu_offload", "cpu"))
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT], tiny_config(train_steps=1))
    with pytest.raises(ValueError, match="model_cpu_offload"):
        trainer.train()
    assert not trainer.lora.attached


def test_prompt_file_names_from_a_workflow_stay_in_the_input_folder(tmp_path):
    inside = tmp_path / "input"
    inside.mkdir()
    (inside / "prompts.txt").write_text("a cat\na dog\n")
    (tmp_path / "secret.txt").write_text("not for workflows\n")
    assert load_prompts("prompts.txt", [inside], confine=True) == ["a cat", "a dog"]
    for bad in ("../secret.txt", str(tmp_path / "secret.txt")):
        with pytest.raises(ValueError, match="must be a relative path inside"):
            load_prompts(bad, [inside], confine=True)
    # The CLI reads whatever path its user gives.
    assert load_prompts(str(tmp_path / "secret.txt"), [inside]) == ["not for workflows"]


def factors(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.lora.named_factors()}


def test_resume_with_optimizer_state_matches_an_uninterrupted_run(pipes, tmp_path, caplog):
    """4 steps in one go == 2 steps + resume + 2 steps, bitwise: AdamW's moments and the float32
    weights (the LoRA file is bf16) come back from the run's training_state.safetensors; the seeds, the
    prompt order and the 'random' backprop steps derive from (seed, step), so no RNG state is needed."""
    import shutil

    from safetensors.torch import load_file

    pipe = pipes["v5.1"]
    prompts = [PROMPT, "a dog", "a red car"]
    config = tiny_config(train_steps=4, cfg=1.0, sampling_steps=3, backprop="random", backprop_k=2,
                         grad_accumulation=2, learning_rate=3e-2, weight_decay=1e-2)
    first_half = tiny_config(**{**config.to_dict(), "train_steps": 2})

    def trainer(cfg, out, resume=None):
        return RewardLoRATrainer(EasyAnimateModel(pipe), ColorfulnessReward(), prompts, cfg, output_path=out,
                                 resume_from=resume)  # bf16 LoRA files (the default)

    whole = trainer(config, tmp_path / "whole.safetensors")
    whole.train()
    out = tmp_path / "halves.safetensors"
    trainer(first_half, out).train()
    moments = state_file(out)
    assert moments == tmp_path / "easyanimate_reward_runs" / "halves" / "training_state.safetensors"
    assert moments.is_file()
    sidecar = run_json(out)
    assert sidecar["state_file"] == moments.name and sidecar["step"] == 2
    stored = load_file(str(moments))
    path0 = f"{whole.lora.paths[0]}.up"
    assert {f"{path0}.exp_avg", f"{path0}.exp_avg_sq", f"{path0}.step", f"{path0}.master"} <= set(stored)
    assert stored[f"{path0}.step"].item() == 2 and stored[f"{path0}.master"].dtype == torch.float32
    # The same checkpoint without its training state: a copy of the run under another name.
    shutil.copy(out, tmp_path / "fresh.safetensors")
    (tmp_path / "easyanimate_reward_runs" / "fresh").mkdir()
    shutil.copy(RunLayout.for_lora_file(out).run_json, RunLayout.for_lora_file(tmp_path / "fresh.safetensors").run_json)

    caplog.clear()
    with caplog.at_level("WARNING"):
        resumed = trainer(config, out, resume=out)
        result = resumed.train()
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert result.state.step == 4
    expected, actual = factors(whole), factors(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert result.state.history["reward"] == whole.state.history["reward"]
    final_whole, final_halves = load_file(str(state_file(whole.output_path))), load_file(str(moments))
    assert all(torch.equal(final_whole[k], final_halves[k]) for k in final_whole)

    # Without the optimizer file the run warns and restarts the moments: the result differs.
    caplog.clear()
    with caplog.at_level("WARNING"):
        fresh = trainer(config, tmp_path / "fresh.safetensors", resume=tmp_path / "fresh.safetensors")
        fresh.train()
    assert "without training state" in caplog.text
    gap = max((expected[n] - p).abs().max().item() for n, p in factors(fresh).items())
    assert gap > 1e-5

    # A state file from another save (step 4 beside a step-2 LoRA) is refused, not used.
    caplog.clear()
    stale = tmp_path / "stale.safetensors"
    trainer(first_half, stale).train()  # a step-2 checkpoint ...
    shutil.copy(moments, state_file(stale))  # ... next to the step-4 training state
    with caplog.at_level("WARNING"):
        trainer(config, tmp_path / "after_stale.safetensors", resume=stale).train()
    assert "saved at step 4" in caplog.text and "the LoRA at step 2" in caplog.text


def test_best_held_out_checkpoint(pipes, tmp_path):
    pipe = pipes["v5"]
    config = tiny_config(train_steps=4, learning_rate=1e-1, eval_every=1, backprop="all", cfg=1.0,
                         sampling_steps=2)
    out = tmp_path / "run.safetensors"
    snapshots = {}
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT], config, output_path=out,
                                eval_prompts=["a dog running on the beach at sunset"],
                                on_step=lambda report: snapshots.update({report.step: factors(trainer)}))
    result = trainer.train()
    history = result.state.history
    assert history["eval_step"] == [0, 1, 2, 3, 4]
    best_index = max(range(5), key=lambda i: history["eval_reward"][i])  # loss = -reward: best = highest
    assert best_index > 0, history  # training raised the held-out reward
    assert result.best_step == best_index and result.best_eval_reward == history["eval_reward"][best_index]
    assert result.best_path == best_path(out) == tmp_path / "run.best.safetensors" and result.best_path.is_file()
    assert result.layout == RunLayout.for_lora_file(out)
    # It is a plain LoRA holding the weights of the best step, and its sidecar says which step that was.
    weights = load_lora_file(result.best_path, pipe.transformer)
    for name, tensor in snapshots[best_index].items():
        path, factor = name.rsplit(".", 1)
        torch.testing.assert_close(getattr(weights.modules[path], factor).float(), tensor, rtol=1e-2, atol=1e-4)
    assert weights.metadata["easyanimate_reward_best_step"] == str(best_index)
    assert weights.metadata["easyanimate_reward_best_of"] == "run.safetensors"
    main_side = run_json(out)
    assert main_side["best_file"] == "run.best.safetensors" and main_side["best_step"] == best_index
    assert main_side["best_eval_reward"] == pytest.approx(history["eval_reward"][best_index])
    # A resumed run keeps pointing at that best file until it improves on it.
    resumed = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT], config, output_path=out,
                                eval_prompts=["a dog running on the beach at sunset"], resume_from=out).train()
    assert resumed.stop_reason == "already done" and resumed.best_path == result.best_path
    assert resumed.best_step == best_index


def test_training_on_top_of_an_unfused_lora_applied_inside_inference_mode(tiny_models, tmp_path):
    """ComfyUI runs every node under torch.inference_mode(): the LoRA file is read there and the
    sampler builds the adapters there. Training on top of that model must still backpropagate."""
    from easyanimate_reward.easyanimate.lora_format import save_lora_file
    from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video

    pipe = load_pipe(tiny_models["v5"], "fp32", "none")
    extra = LoraLayers(pipe.transformer, 4, 4.0, seed=1)
    with torch.no_grad():
        for factor in extra.up:
            factor.normal_(0, 0.05)
    path = save_lora_file(tmp_path / "applied.safetensors", extra.to_weights(), dtype=torch.float32)
    with torch.inference_mode():
        weights = load_lora_file(path, pipe.transformer)
        model = EasyAnimateModel(pipe).with_lora(weights.with_mode("unfused"), 1.0, "applied")
        sample_video(model, SampleRequest("a cat", width=32, height=32, frames=5, steps=2))
        config = TrainConfig(width=32, height=32, frames=5, sampling_steps=2, cfg=1.0, rank=4,
                             alpha=4.0, train_steps=1, save_every=0, backprop="last", gradient_checkpointing=False)
        result = RewardLoRATrainer(model, SaturationReward(), ["a cat"], config).train()
    assert result.state.step == 1 and math.isfinite(result.state.history["reward"][0])
