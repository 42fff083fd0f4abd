"""Reliability of reward training in plain Python (issue 9): runs never replace files they did not
create, unwritable names and bad settings are refused before any work, resume is exact with
clipping and with fp16 loss scaling, 'uniform' draws anew each step, training and merged saving
stop between units on cancel, and a fused LoRA patched inside inference mode does not break
training afterwards."""

import math
import os
import random

import pytest
import torch

from easyanimate_reward.easyanimate.cancel import cancel_check
from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.lora_format import load_lora_file, save_lora_file
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.fileio import atomic_folder, confined_path
from easyanimate_reward.reward.base import Reward
from easyanimate_reward.reward.simple import SaturationReward
from easyanimate_reward.training.config import TrainConfig, select_grad_steps
from easyanimate_reward.training.lora_layers import LoraLayers
from easyanimate_reward.training.trainer import RewardLoRATrainer

PROMPT = "a cat playing piano in a sunny room"


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_pipe(tiny_models["v5"], "fp32", "none")


def config(**overrides) -> TrainConfig:
    base = dict(width=32, height=32, frames=5, sampling_steps=2, cfg=1.0, rank=4, alpha=4.0,
                learning_rate=3e-2, weight_decay=1e-2, max_grad_norm=1.0, save_every=0, seed=0, backprop="last",
                gradient_checkpointing=False, train_steps=1)
    base.update(overrides)
    return TrainConfig(**base)


class CountingReward(SaturationReward):
    name = "counting"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def score(self, frames, prompts):
        self.calls += 1
        return super().score(frames, prompts)


def factors(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.lora.named_factors()}


# -- item 2: never replace a file the run did not create -----------------------------------------


def test_a_new_run_never_replaces_files_it_did_not_create(pipe, tmp_path):
    users = tmp_path / "mine.safetensors"
    other = LoraLayers(pipe.transformer, 4, 4.0, seed=9)
    save_lora_file(users, other.to_weights(), dtype=torch.float32)
    stale_best = tmp_path / "mine.best.safetensors"
    stale_best.write_bytes(b"a .best of some other run")
    before = users.read_bytes()

    first = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT], config(eval_every=1),
                              output_path=users, eval_prompts=["a dog"]).train()
    assert users.read_bytes() == before and stale_best.read_bytes() == b"a .best of some other run"
    assert first.saved_path == tmp_path / "mine_001.safetensors"
    assert first.layout.folder == tmp_path / "easyanimate_reward_runs" / "mine_001"
    run_id = load_lora_file(first.saved_path, pipe.transformer).metadata["easyanimate_reward_run_id"]
    if first.best_path is not None:  # the .best of this run is this run's
        assert first.best_path == tmp_path / "mine_001.best.safetensors"
        assert load_lora_file(first.best_path, pipe.transformer).metadata["easyanimate_reward_run_id"] == run_id
    # Queued again with the same name: the next counter, the earlier run untouched.
    kept = first.saved_path.read_bytes()
    second = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT], config(),
                               output_path=users).train()
    assert second.saved_path == tmp_path / "mine_002.safetensors" and first.saved_path.read_bytes() == kept
    # Resuming a run into its own name continues that run, in its own files.
    resumed = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT], config(train_steps=2),
                                output_path=second.saved_path, resume_from=second.saved_path).train()
    assert resumed.saved_path == second.saved_path and resumed.state.step == 2


class NanReward(Reward):
    name = "nan"

    def score(self, frames, prompts):
        return SaturationReward()(frames) * float("nan")


def test_a_run_stopped_at_step_0_writes_over_nothing(pipe, tmp_path):
    from easyanimate_reward.training.trainer import TrainingDivergedError

    out = tmp_path / "nan.safetensors"
    with pytest.raises(TrainingDivergedError, match="no LoRA file was written"):
        RewardLoRATrainer(EasyAnimateModel(pipe), NanReward(), [PROMPT], config(train_steps=3),
                          output_path=out).train()
    assert not out.exists() and not (tmp_path / "nan.best.safetensors").exists()


# -- item 3: every file the run will write is checked before the first rollout ------------------


def test_unwritable_names_are_refused_before_the_first_rollout(pipe, tmp_path):
    reward = CountingReward()
    long_name = tmp_path / ("x" * 240 + ".safetensors")  # fits, but its .best and temporary names do not
    with pytest.raises(OSError, match="cannot write"):
        RewardLoRATrainer(EasyAnimateModel(pipe), reward, [PROMPT], config(train_steps=2),
                          output_path=long_name).train()
    assert reward.calls == 0
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # nothing written, nothing left


# -- item 4: atomic writers only remove what they made -------------------------------------------


def test_atomic_folder_leaves_a_users_partial_folder_alone(tmp_path):
    users = tmp_path / "model.partial"
    users.mkdir()
    (users / "notes.txt").write_text("the user's own files")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_folder(tmp_path / "model") as partial:
            assert partial != users and partial.parent == tmp_path
            (partial / "half.bin").write_bytes(b"half")
            raise Boom()
    with atomic_folder(tmp_path / "model") as partial:
        (partial / "done.bin").write_bytes(b"done")
    assert (users / "notes.txt").read_text() == "the user's own files"
    assert sorted(os.listdir(tmp_path)) == ["model", "model.partial"]


# -- item 5: cancel between training steps and between the tensors of a merged save ---------------


class Cancelled(Exception):
    pass


def test_cancel_stops_training_between_steps(pipe, tmp_path):
    reward = CountingReward()
    calls = []

    def spy():
        calls.append(reward.calls)
        if reward.calls == 2:  # two rollouts done: cancel is pressed
            raise Cancelled()

    out = tmp_path / "cancel.safetensors"
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), reward, [PROMPT], config(train_steps=10), output_path=out)
    with cancel_check(spy), pytest.raises(Cancelled):
        trainer.train()
    assert reward.calls == 2 and trainer.state.step == 2  # stopped before the third rollout
    assert load_lora_file(out, pipe.transformer).metadata["easyanimate_reward_step"] == "2"


def test_cancel_stops_a_merged_save_between_tensors(pipe, tmp_path):
    from easyanimate_reward.easyanimate.lora_merge import save_merged_model

    lora = LoraLayers(pipe.transformer, 4, 4.0, seed=1)
    model = EasyAnimateModel(pipe).with_lora(lora.to_weights(), 0.5, "x")
    produced = []

    def spy():
        produced.append(1)
        if len(produced) == 3:
            raise Cancelled()

    dest = tmp_path / "merged"
    with cancel_check(spy), pytest.raises(Cancelled):
        save_merged_model(pipe, model.loras, dest)
    assert len(produced) == 3 and not dest.exists() and os.listdir(tmp_path) == []


# -- item 1: a fused LoRA patched inside inference mode, then training -----------------------------


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_training_after_sampling_a_lora_patched_inside_inference_mode(tiny_models, tmp_path, mode):
    from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video

    pipe = load_pipe(tiny_models["v5"], "fp32", "none")
    extra = LoraLayers(pipe.transformer, 4, 4.0, seed=1)
    with torch.no_grad():
        for factor in extra.up:
            factor.normal_(0, 0.05)
    weights = load_lora_file(save_lora_file(tmp_path / "a.safetensors", extra.to_weights()), pipe.transformer)
    with torch.inference_mode():  # ComfyUI runs every node so
        sample_video(EasyAnimateModel(pipe).with_lora(weights.with_mode(mode), 0.7, "a"),
                     SampleRequest("a cat", width=32, height=32, frames=5, steps=2))
    with torch.inference_mode():
        model = EasyAnimateModel(pipe).with_lora(weights.with_mode(mode), 0.5, "a")
        result = RewardLoRATrainer(model, SaturationReward(), ["a cat"], config()).train()
    assert result.state.step == 1 and math.isfinite(result.state.history["reward"][0])


# -- item 8: uniform draws its offset anew at every step; a step list implies 'list' --------------


def test_uniform_draws_a_fresh_offset_so_k_steps_always_train(pipe):
    draws = [select_grad_steps("uniform", 10, k=3, rng=random.Random(seed)) for seed in range(60)]
    assert all(len(d) == 3 and d[1] - d[0] == d[2] - d[1] == 3 and 0 <= d[0] <= 2 for d in draws), draws
    assert {d[0] for d in draws} == {0, 1, 2}  # every offset in [0, T // K - 1] occurs
    assert select_grad_steps("spread", 10, k=3) == [0, 4, 9]  # the old fixed set, under its own name
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT],
                                config(backprop="uniform", backprop_k=3, sampling_steps=10))
    per_step = [tuple(trainer.grad_steps_for(step, 0)(10)) for step in range(20)]
    assert len(set(per_step)) > 1 and per_step == [tuple(trainer.grad_steps_for(s, 0)(10)) for s in range(20)]
    # backprop_steps without strategy 'list': 'auto' means 'list', another strategy is refused.
    with pytest.raises(ValueError, match="backprop_steps"):
        config(backprop="tail", backprop_steps="0, 1").validate()
    listed = RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT],
                               config(backprop="auto", backprop_steps="0", sampling_steps=3))
    assert listed.strategy == "list" and listed.grad_steps_for(0, 0)(3) == [0]


# -- item 9: resume exact with gradient clipping --------------------------------------------------


def test_resume_is_exact_with_gradient_clipping(pipe, tmp_path):
    cfg = config(train_steps=2, max_grad_norm=0.3, learning_rate=5e-2, backprop="all", loss_scale=1e3)

    def trainer(c, out, resume=None):
        return RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), [PROMPT, "a dog"], c,
                                 output_path=out, resume_from=resume)

    whole = trainer(cfg, tmp_path / "whole.safetensors")
    whole.train()
    assert all(n > 0.3 for n in whole.state.history["grad_norm"]), whole.state.history  # clipping is active
    half = tmp_path / "half.safetensors"
    trainer(config(**{**cfg.to_dict(), "train_steps": 1}), half).train()
    resumed = trainer(cfg, half, resume=half)
    resumed.train()
    assert resumed.lora.paths == whole.lora.paths  # the model's order, not the file's
    expected, actual = factors(whole), factors(resumed)
    assert all(torch.equal(expected[n], actual[n]) for n in expected), \
        max((expected[n] - actual[n]).abs().max().item() for n in expected)


# -- item 10: fp16 trains with loss scaling; an inf gradient skips the step ------------------------


class InfGradientOnce(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(x):
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        InfGradientOnce.calls += 1
        bad = InfGradientOnce.calls == 1
        return torch.full(ctx.shape, float("inf")) if bad else torch.zeros(ctx.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape = inputs[0].shape


class InfOnceReward(SaturationReward):
    name = "inf_once"

    def score(self, frames, prompts):
        return super().score(frames, prompts) + InfGradientOnce.apply(frames)


def test_fp16_inf_gradient_skips_the_step_and_resume_restores_the_scaler(tiny_models, tmp_path):
    pipe16 = load_pipe(tiny_models["v5"], "fp16", "none")
    cfg = config(train_steps=3, learning_rate=5e-2)

    def trainer(c, out, resume=None):
        return RewardLoRATrainer(EasyAnimateModel(pipe16), InfOnceReward(), [PROMPT], c, output_path=out,
                                 resume_from=resume)

    InfGradientOnce.calls = 0
    whole = trainer(cfg, tmp_path / "whole.safetensors")
    result = whole.train()  # today: "the gradient norm is inf at step 1"
    norms = result.state.history["grad_norm"]
    assert result.state.step == 3 and not math.isfinite(norms[0]) and all(map(math.isfinite, norms[1:]))
    assert whole.scaler.is_enabled() and whole.scaler.get_scale() == 2.0 ** 15  # halved once
    assert any(p.abs().sum() > 0 for p in whole.lora.up)  # the later steps trained

    InfGradientOnce.calls = 0
    half = tmp_path / "half.safetensors"
    trainer(config(**{**cfg.to_dict(), "train_steps": 1}), half).train()
    resumed = trainer(cfg, half, resume=half)
    resumed.train()
    assert resumed.scaler.get_scale() == whole.scaler.get_scale()
    expected, actual = factors(whole), factors(resumed)
    assert all(torch.equal(expected[n], actual[n]) for n in expected)


# -- item 14 (trainer settings) and 16: refused before any work -----------------------------------


@pytest.mark.parametrize("field", ["max_reward", "loss_scale", "learning_rate", "weight_decay", "adam_eps",
                                   "max_grad_norm", "cfg", "alpha"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("1e400"), -float("inf")])
def test_non_finite_trainer_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        config(**{field: value}).validate()


def test_typed_numbers_are_plain_and_finite():
    from easyanimate_reward.training.config import parse_optional_number

    assert parse_optional_number("", "max_reward") is None and parse_optional_number(" 1e-1 ", "x") == 0.1
    for bad in ("nan", "inf", "-inf", "1e400", "1_0", "0x10", "one"):
        with pytest.raises(ValueError, match="max_reward"):
            parse_optional_number(bad, "max_reward")


@pytest.mark.parametrize("name", ["/tmp/x", "C:/x", "C:x", "~/x", "\\\\server\\x"])
def test_absolute_names_are_refused_by_the_one_confinement_rule(tmp_path, name):
    with pytest.raises(ValueError, match="must be a relative path inside"):
        confined_path(tmp_path, name, what="lora_name")
