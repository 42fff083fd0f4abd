"""The trainer features the official recipe uses: learning-rate schedules with warmup, Adam betas,
scale_lr, DDIM eta, numbered checkpoints with a total limit, TensorBoard logs and plot.png,
validation videos, the official per-reward loss presets and image-to-video rollouts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.reward.registry import load_reward
from easyanimate_reward.training.checkpoint import numbered_checkpoints
from easyanimate_reward.training.config import TrainConfig
from easyanimate_reward.training.loss_presets import loss_settings
from easyanimate_reward.training.prompts import TrainingPrompt, load_prompt_items, read_prompt_items
from easyanimate_reward.training.rollout import PromptBank, RolloutSettings, rollout_condition, rollout_video
from easyanimate_reward.training.run_layout import RunLayout
from easyanimate_reward.training.trainer import RewardLoRATrainer
from test_training import tiny_config

PROMPTS = ["a cat playing piano in a sunny room", "a dog running on the beach at sunset"]


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_pipe(tiny_models["v5"], "fp32", "none")


def train(pipe, tmp_path, name="run", prompts=PROMPTS, **overrides):
    defaults = dict(backprop="last", sampling_steps=2, cfg=1.0, train_steps=3, tensorboard=False)
    config = tiny_config(**{**defaults, **overrides})
    validation = [PROMPTS[0]] if config.validation_every else []
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), load_reward("colorfulness"), prompts, config,
                                output_path=tmp_path / f"{name}.safetensors", validation_prompts=validation)
    return trainer, trainer.train()


# -- learning rate -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_follows_diffusers_schedule_with_warmup(pipe, tmp_path, schedule):
    from diffusers.optimization import get_scheduler

    trainer, result = train(pipe, tmp_path, train_steps=5, lr_scheduler=schedule, lr_warmup_steps=2,
                            learning_rate=1e-2)
    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    reference = get_scheduler(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2),
                              num_warmup_steps=2, num_training_steps=5)
    expected = []
    for _ in range(5):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert result.state.history["lr"] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == 0.0 and expected[2] == pytest.approx(1e-2)  # the warmup is there


def test_resume_continues_the_schedule(pipe, tmp_path):
    settings = dict(lr_scheduler="cosine", lr_warmup_steps=1, learning_rate=1e-2, save_every=1)
    _, whole = train(pipe, tmp_path, "whole", train_steps=4, **settings)
    _, first = train(pipe, tmp_path, "part", train_steps=2, **settings)
    config = tiny_config(backprop="last", sampling_steps=2, cfg=1.0, train_steps=4, tensorboard=False, **settings)
    resumed = RewardLoRATrainer(EasyAnimateModel(pipe), load_reward("colorfulness"), PROMPTS, config,
                                output_path=first.saved_path, resume_from=first.saved_path).train()
    assert resumed.state.history["lr"] == pytest.approx(whole.state.history["lr"], rel=1e-12)


def test_scale_lr_multiplies_by_the_global_batch_and_betas_reach_adamw(pipe, tmp_path):
    trainer, result = train(pipe, tmp_path, train_steps=1, scale_lr=True, grad_accumulation=2, batch_size=2,
                            learning_rate=1e-3, adam_beta1=0.8, adam_beta2=0.95)
    assert result.state.history["lr"] == [pytest.approx(4e-3)]
    assert trainer.optimizer.param_groups[0]["betas"] == (0.8, 0.95)


# -- DDIM eta ----------------------------------------------------------------------------------


def test_ddim_eta_adds_seeded_noise_and_other_samplers_refuse_it(pipe):
    bank = PromptBank(pipe, PROMPTS[:1])
    base = dict(width=32, height=32, frames=5, sampling_steps=3, guidance_scale=1.0, scheduler="DDIM")

    def video(**extra):
        with torch.no_grad():
            return rollout_video(pipe, RolloutSettings(**dict(base, **extra)), bank.cond(PROMPTS[:1]), None, [5])

    plain, noisy, again = video(), video(eta=1.0), video(eta=1.0)
    assert torch.equal(noisy, again)  # the noise comes from the video's own seed
    assert (noisy - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="eta 0.5 is a DDIM setting"):
        video(eta=0.5, scheduler="Euler")


# -- checkpoints, logs, plot --------------------------------------------------------------------


def test_numbered_checkpoints_keep_the_newest_of_this_run_only(pipe, tmp_path):
    config = tiny_config(backprop="last", sampling_steps=2, cfg=1.0, train_steps=5, tensorboard=False, save_every=1,
                         checkpoints_total_limit=2)
    planted = []

    def plant_a_foreign_checkpoint(report):
        # In the run's own checkpoints/, named like its oldest checkpoint, but not written by the run:
        # the limit must never remove it.
        if report.step == 1:
            foreign = trainer.layout.checkpoint(0)
            foreign.write_bytes(b"the user's file")
            planted.append(foreign)

    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), load_reward("colorfulness"), PROMPTS, config,
                                output_path=tmp_path / "ck.safetensors", on_step=plant_a_foreign_checkpoint)
    result = trainer.train()
    kept = numbered_checkpoints(result.layout, trainer.run_id)
    assert [p.name for p in kept] == ["ck-step000003.safetensors", "ck-step000004.safetensors"]
    assert planted[0].read_bytes() == b"the user's file"
    assert sorted(p.name for p in result.layout.checkpoints.iterdir()) == [
        "ck-step000000.safetensors", "ck-step000003.safetensors", "ck-step000004.safetensors"]
    from easyanimate_reward.easyanimate.lora_format import load_lora_file

    assert load_lora_file(kept[-1], pipe.transformer).metadata["easyanimate_reward_step"] == "4"
    _, again = train(pipe, tmp_path, "ck_all", train_steps=3, save_every=1)
    assert len(list(again.layout.checkpoints.glob("*.safetensors"))) == 2  # periodic saves at 1, 2 (3 is the end)


def test_tensorboard_logs_scalars_and_frames_and_the_run_writes_its_plot(pipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = RewardLoRATrainer(
        EasyAnimateModel(pipe), load_reward("colorfulness"), PROMPTS,
        tiny_config(backprop="last", sampling_steps=2, cfg=1.0, train_steps=2, tensorboard=True, log_frames_every=2,
                    eval_every=1), output_path=tmp_path / "tb.safetensors", eval_prompts=["a red car"])
    result = trainer.train()
    events = EventAccumulator(str(result.layout.logs), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/reward", "train/loss", "train/grad_norm", "train/lr", "train/step_seconds", "held_out/reward",
            "held_out/loss"} <= scalars
    rewards = [e.value for e in events.Scalars("train/reward")]
    assert rewards == pytest.approx(result.state.history["reward"], rel=1e-6)
    assert [e.step for e in events.Images("train/frames")] == [2]
    plot = Image.open(result.layout.plot)
    assert plot.format == "PNG" and plot.size[0] == 640


def test_tensorboard_off_writes_no_logs(pipe, tmp_path):
    _, result = train(pipe, tmp_path, "quiet", train_steps=1, tensorboard=False)
    assert not result.layout.logs.exists() and result.layout.plot.is_file()


# -- validation videos ---------------------------------------------------------------------------


def test_validation_videos_are_saved_as_mp4_at_their_own_settings_and_scored(pipe, tmp_path):
    import av

    trainer, result = train(pipe, tmp_path, "val", train_steps=2, validation_every=2, validation_width=48,
                            validation_height=32, validation_frames=9, validation_steps=2, validation_cfg=3.0)
    video = result.layout.validation_video(2, 0)
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    scores = json.loads(result.layout.validation_scores.read_text())
    assert scores["2"]["videos"][video.name]["prompt"] == PROMPTS[0]
    assert result.state.history["validation_step"] == [2]
    assert result.state.history["validation_reward"] == [pytest.approx(scores["2"]["mean"])]
    with pytest.raises(ValueError, match="no validation prompts"):
        RewardLoRATrainer(EasyAnimateModel(pipe), load_reward("colorfulness"), PROMPTS,
                          tiny_config(validation_every=1), output_path=tmp_path / "x.safetensors")
    held_out = RewardLoRATrainer(EasyAnimateModel(pipe), load_reward("colorfulness"), PROMPTS,
                                 tiny_config(validation_every=1), output_path=tmp_path / "y.safetensors",
                                 eval_prompts=[f"held-out {i}" for i in range(6)])
    assert held_out.validation.prompts == [f"held-out {i}" for i in range(4)]


# -- loss presets --------------------------------------------------------------------------------


class Scored:
    def __init__(self, kind, **options):
        self.kind, self.loader_options, self.name = kind, options, kind


def test_official_loss_presets_need_the_official_score_scale():
    preset = TrainConfig(loss_preset="official")
    assert loss_settings(preset, Scored("hps_v2.1")) == (1.0, 1.0)
    assert loss_settings(preset, Scored("aesthetic_v2")) == (10.0, 0.1)
    assert loss_settings(preset, Scored("pickscore", use_logit_scale=False)) == (1.0, 1.0)
    for kind in ("pickscore", "mps"):
        with pytest.raises(ValueError, match="scoring = easyanimate"):
            loss_settings(preset, Scored(kind))  # the pack's own x100 scale
    with pytest.raises(ValueError, match="single official rewards"):
        loss_settings(preset, load_reward("saturation"))
    assert loss_settings(TrainConfig(max_reward=2.0, loss_scale=0.5), Scored("hps_v2.1")) == (2.0, 0.5)
    with pytest.raises(ValueError, match="clear max_reward"):
        TrainConfig(loss_preset="official", max_reward=1.0).validate()
    assert load_reward("saturation").kind == "saturation"  # the registry marks what it loaded


# -- image-to-video rollouts ----------------------------------------------------------------------


def write_image(path, color):
    Image.fromarray(np.full((40, 40, 3), color, np.uint8)).save(path)


def test_prompt_lines_and_jsonl_name_start_images(tmp_path):
    write_image(tmp_path / "red.png", (255, 0, 0))
    (tmp_path / "p.txt").write_text("red.png | a red ball rolls\na plain prompt | with a bar\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a red ball", "image": "red.png"}) + "\n")
    items = read_prompt_items(tmp_path / "p.txt")
    assert items == [TrainingPrompt("a red ball rolls", tmp_path / "red.png"),
                     TrainingPrompt("a plain prompt | with a bar")]
    assert read_prompt_items(tmp_path / "p.jsonl")[0].image == tmp_path / "red.png"
    assert load_prompt_items("red.png | a ball", [tmp_path])[0].image == tmp_path / "red.png"
    with pytest.raises(FileNotFoundError, match="start image 'blue.png'"):
        load_prompt_items("blue.png | a ball", [tmp_path])
    with pytest.raises(ValueError, match="start image"):
        load_prompt_items("../red.png | a ball", [tmp_path / "sub"])  # confined to the input folder


def test_image_to_video_rollouts_condition_each_video_on_its_image(pipe, tmp_path):
    from easyanimate_reward.easyanimate.sampling import inpaint_condition, latent_shape

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shape = latent_shape(2, 32, 32, 5)
    mixed = rollout_condition(pipe, shape, 5, [1, 2], [image, None])
    alone = inpaint_condition(pipe, (1, *shape[1:]), 5, image, [1])
    assert torch.equal(mixed[:1], alone) and torch.count_nonzero(mixed[1]) == 0
    write_image(tmp_path / "start.png", (200, 40, 40))
    prompts = load_prompt_items("start.png | a red ball", [tmp_path])
    trainer, result = train(pipe, tmp_path, "i2v", prompts=prompts, train_steps=1)
    _, plain = train(pipe, tmp_path, "t2v", prompts=["a red ball"], train_steps=1)
    assert result.state.history["reward"] != plain.state.history["reward"]
    _, off = train(pipe, tmp_path, "off", prompts=prompts, train_steps=1, start_images=False)
    assert off.state.history["reward"] == plain.state.history["reward"]


def test_start_images_on_a_text_to_video_model_are_refused_before_work(tiny_variants, tmp_path):
    write_image(tmp_path / "start.png", (0, 0, 255))
    t2v = load_pipe(tiny_variants["v5-t2v"], "fp32", "none")
    prompts = load_prompt_items("start.png | a blue sky", [tmp_path])
    with pytest.raises(ValueError, match="image-to-video rollouts need an InP model"):
        train(t2v, tmp_path, "refused", prompts=prompts, train_steps=1)
    assert not (tmp_path / "refused.safetensors").exists()


# -- one table: node inputs, CLI flags, config fields ----------------------------------------------


def test_every_training_setting_has_one_row_and_one_cli_flag_with_its_tooltip():
    from dataclasses import fields

    from easyanimate_reward.training.__main__ import build_parser
    from easyanimate_reward.training.config import PromptSources
    from easyanimate_reward.training.settings import rows

    table = rows(TrainConfig, PromptSources)
    assert [r.name for r in table] == [f.name for f in fields(TrainConfig)] + [f.name for f in fields(PromptSources)]
    actions = {a.dest: a for a in build_parser()._actions}
    for row in table:
        action = actions[row.name]
        assert action.option_strings == [row.flag] or row.flag in action.option_strings
        assert action.help == row.spec.tooltip.replace("%", "%%") and action.default == row.default
        if row.spec.choices:
            assert tuple(action.choices) == row.spec.choices
    # one name per setting: the old second names are gone
    assert not {"guidance_scale", "detach_input", "output"} & set(actions)


def test_trainer_node_and_settings_nodes_are_generated_from_the_table(comfy_server):
    from easyanimate_reward.training.config import PromptSources
    from easyanimate_reward.training.settings import RUN, SETTINGS_GROUPS, group_rows, rows
    from train_graph import SETTINGS_NODE_IDS, TRAINER, widget_default

    info = comfy_server.object_info()
    shown = {}
    for node_id, groups in [(TRAINER, [RUN])] + [(SETTINGS_NODE_IDS[g], [g]) for g in SETTINGS_GROUPS]:
        node = info[node_id]["input"]
        inputs = {**node.get("required", {}), **node.get("optional", {})}
        for group in groups:
            for row in group_rows(group, TrainConfig, PromptSources):
                assert row.name not in shown, f"{row.name} is on two nodes"
                kind, options = inputs[row.name][0], inputs[row.name][1]
                assert options["tooltip"] == row.spec.tooltip
                default = options.get("default")
                if isinstance(kind, list):  # an old-style combo: options as the first element
                    default = options.get("default", kind[0])
                assert default == widget_default(row), row.name
                shown[row.name] = node_id
        if node_id == TRAINER:
            assert set(inputs) >= set(SETTINGS_GROUPS)
    assert set(shown) == {row.name for row in rows(TrainConfig, PromptSources)}
    assert len(info[TRAINER]["input"]["required"]) <= 8  # the trainer opens readable


def test_validation_videos_that_do_not_fit_beside_the_training_state_are_refused_before_work(pipe, tmp_path,
                                                                                           monkeypatch):
    from easyanimate_reward.easyanimate import preflight

    config = tiny_config(backprop="last", sampling_steps=2, cfg=1.0, train_steps=1, validation_every=1,
                         validation_width=1024, validation_height=1024, validation_frames=145)
    step, validation = preflight.estimate_training(pipe, config)
    assert validation.name == "validation video 1024x1024x145" and validation.weights == step.weights
    assert validation.total > 2 * step.total  # whole large videos need more than the tiny training step
    budget = (step.total * preflight.SAFETY * 1.01 + validation.total) / 2  # fits the step, not the videos
    monkeypatch.setenv(preflight.BUDGET_ENV, f"{budget / 1e9:.9f}")  # the variable is in GB
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), load_reward("colorfulness"), PROMPTS, config,
                                output_path=tmp_path / "big.safetensors", validation_prompts=[PROMPTS[0]])
    with pytest.raises(preflight.MemoryPreflightError, match="validation video 1024x1024x145.*smaller validation"):
        trainer.train()
    assert trainer.lora is None and not (tmp_path / "big.safetensors").exists()
