"""Reward model nodes: load a reward, combine rewards, score frames, rank candidate videos.

Thin adapters: loading lives in reward/registry.py, batching and ranking in reward/scoring.py,
plots in reward/plot.py.
"""

from __future__ import annotations

import comfy.model_management as mm
import folder_paths
import torch
from comfy_api.latest import io

from ..reward.combine import NORMALIZATIONS, normalized_combination
from ..easyanimate.precision import REWARD_DTYPES
from ..reward.plot import plot_series
from ..reward.ranges import range_for
from ..reward.registry import (REWARD_KINDS, SCORINGS, check_files, expected_files, missing_files, needs_files,
                               load_reward, scoring_options)
from ..reward.scoring import format_frame_scores, format_ranking, rank_videos, score_images, select_videos
from .common import REWARD_FOLDER, progress_callback
from .schema import (image_output, node_id, node_schema, reward_and_frames, reward_input, reward_output, reward_prompt_input, scoring_batch_input,
                     shown, text_output)

CATEGORY = "EasyAnimate/reward"
DEVICES = ("auto", "cpu", "gpu")
DTYPES = REWARD_DTYPES
COMBINE_SLOTS = 4


def resolve_device(choice: str) -> torch.device:
    """auto: the host's compute device (CPU when ComfyUI runs with --cpu); gpu: the same, but an error
    when it is the CPU; cpu: the CPU (slow for CLIP-H, keeps VRAM for the video model)."""
    if choice == "cpu":
        return torch.device("cpu")
    device = mm.get_torch_device()
    if choice == "gpu" and torch.device(device).type == "cpu":
        raise RuntimeError("device 'gpu' was chosen but ComfyUI has no GPU device; choose 'auto' or 'cpu'")
    return torch.device(device)


def find_reward_folder(kind: str) -> str | None:
    """The first registered reward_models folder that holds everything `kind` needs."""
    bases = folder_paths.get_folder_paths(REWARD_FOLDER)
    if not needs_files(kind):
        return bases[0] if bases else None
    for base in bases:
        if not missing_files(kind, base):
            return base
    if not bases:
        raise FileNotFoundError(f"no '{REWARD_FOLDER}' model folder is registered with ComfyUI")
    check_files(kind, bases[0])  # raises, naming the exact files expected in the default folder
    return bases[0]


def _kind_tooltip() -> str:
    lines = ["Which reward (typical range in brackets). Files are read from models/reward_models:"]
    for kind in REWARD_KINDS:
        files = [f.path + ("/" if f.is_folder else "") for f in expected_files(kind) if f.required]
        limits = range_for(kind)
        span = f" [{limits.low:.3g} .. {limits.high:.3g}]" if limits else ""
        lines.append(f"{kind}{span}: {', '.join(files) if files else 'no files (weight-free)'}")
    return "\n".join(lines)


class RewardModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "RewardModelLoader", "Load Reward Model", CATEGORY,
            "Loads a reward model (a frozen, differentiable judge of frames) from models/reward_models, or a "
            "weight-free reward. Use it to score, rank, or train towards.",
            inputs=[
                io.Combo.Input("kind", options=list(REWARD_KINDS), default="hps_v2.1", tooltip=_kind_tooltip()),
                io.Combo.Input("device", options=list(DEVICES), default="auto",
                               tooltip="auto: ComfyUI's compute device. gpu: the same, error if there is none. "
                                       "cpu: keeps VRAM free for the video model (slow for CLIP-H rewards)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="Weight dtype. auto: bfloat16 on a GPU that supports it, else float32. "
                                       "Weight-free rewards always compute in float32."),
                io.Combo.Input("scoring", options=list(SCORINGS), default="pack", optional=True,
                               tooltip="pack: each model scored as its authors do (PickScore / MPS x100 logit "
                                       "scale, HPS letterbox, CLIP crop). easyanimate: as EasyAnimate's reward "
                                       "trainer does (PickScore / MPS plain cosine, every image squashed to 224), "
                                       "to reproduce its recipes (max_reward 1 assumes the plain cosine)."),
            ],
            outputs=[reward_output("The reward, for Score Frames, Rank Candidates, Combine Rewards, the trainer and "
                                   "the sweep.")],
        )

    @classmethod
    def execute(cls, kind, device, dtype, scoring="pack") -> io.NodeOutput:
        torch_device = resolve_device(device)
        # Outside ComfyUI's inference mode: training backpropagates through the reward's weights.
        with torch.inference_mode(False):
            # dtype "auto" is resolved by the registry for this device (bf16 on a capable GPU).
            reward = load_reward(kind, find_reward_folder(kind), torch_device, dtype, **scoring_options(kind, scoring))
        return io.NodeOutput(reward)


class RewardCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = []
        for slot in range(1, COMBINE_SLOTS + 1):
            inputs.append(reward_input(f"Reward term {slot} (leave unconnected to skip).", f"reward_{slot}",
                                       optional=True))
            inputs.append(io.Float.Input(f"weight_{slot}", default=1.0, min=-1000.0, max=1000.0, step=0.01,
                                         tooltip=f"Weight of reward {slot}; negative penalises it."))
        inputs.append(io.Combo.Input(
            "normalization", options=list(NORMALIZATIONS), default="none", optional=True,
            tooltip="none: raw scores (scales differ ~10^3: colourfulness ~50, HPS ~0.3). scale: each term "
                    "mapped by its kind's typical range to 0..1 first, so the weights mean what they say. zscore: "
                    "each term standardised by running statistics of its scores on the training rollouts "
                    "(saved with the trainer's checkpoints, reset at the start of every training run)."))
        return node_schema(
            "RewardCombine", "Combine Rewards", CATEGORY,
            "Weighted sum of up to four rewards, e.g. 1.0 x HPS + 0.5 x aesthetic + 0.5 x motion. Rewards live on "
            "different scales (HPS ~0.3, PickScore ~20, aesthetic ~5): normalise them ('scale' or 'zscore') or weigh "
            "accordingly.",
            inputs=inputs,
            outputs=[reward_output("The weighted sum as one reward (score, rank or train with it).")],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        terms = [
            (kwargs[f"reward_{slot}"], float(kwargs.get(f"weight_{slot}", 1.0)))
            for slot in range(1, COMBINE_SLOTS + 1)
            if kwargs.get(f"reward_{slot}") is not None
        ]
        if not terms:
            raise ValueError("Combine Rewards: connect at least one reward")
        return io.NodeOutput(normalized_combination(terms, kwargs.get("normalization") or "none"))


class RewardScoreFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "RewardScoreFrames", "Score Frames with Reward", CATEGORY,
            "Scores every frame of an IMAGE batch (one video, frames in order) with a reward; outputs the mean, the "
            "per-frame scores and a plot of score per frame, and shows the scores on the node.",
            inputs=[
                *reward_and_frames("Frames (N, H, W, 3) in 0..1, e.g. a sampled video."),
                reward_prompt_input("frames"),
                scoring_batch_input(),
            ],
            outputs=[
                io.Float.Output(display_name="mean_score", tooltip="The mean of the frames' scores."),
                text_output("frame_scores", "One line per frame: its index and score."),
                image_output("plot", "Score per frame, as an image."),
            ],
            output_node=True,
            node_id_input=True,
        )

    @classmethod
    def execute(cls, reward, frames, prompt, batch_size) -> io.NodeOutput:
        scores = score_images(reward, frames, prompt, batch_size, progress=progress_callback(frames.shape[0]))
        values = scores.tolist()
        mean = float(scores.mean())
        plot = plot_series({reward.name: values}, f"{reward.name}: mean {mean:.4g}", "frame", "score")
        text = format_frame_scores(values)
        return shown(mean, text, plot, text=f"{reward.name} mean {mean:.4f} over {len(values)} frames\n{text}",
                     node=node_id(cls))


class RewardRankCandidates(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "RewardRankCandidates", "Rank Candidate Videos by Reward", CATEGORY,
            "Best-of-N: scores candidate videos laid out one after another in an IMAGE batch (N = candidates x "
            "frames_per_video) and keeps the top_k by mean frame score; shows the ranking on the node.",
            inputs=[
                *reward_and_frames("All candidates' frames, video after video."),
                io.Int.Input("frames_per_video", default=25, min=1, max=4096,
                             tooltip="Frames in each candidate video; the batch size must be a multiple of it."),
                reward_prompt_input("videos"),
                io.Int.Input("top_k", default=1, min=1, max=256,
                             tooltip="How many of the best videos to output (all of them if fewer exist)."),
                scoring_batch_input(),
            ],
            outputs=[
                image_output("best_frames", "The top_k videos' frames, best first."),
                text_output("scores", "Every candidate's rank, index and mean score."),
            ],
            output_node=True,
            node_id_input=True,
        )

    @classmethod
    def execute(cls, reward, frames, frames_per_video, prompt, top_k, batch_size) -> io.NodeOutput:
        ranked = rank_videos(reward, frames, frames_per_video, prompt, batch_size,
                             progress=progress_callback(frames.shape[0]))
        best = select_videos(frames, frames_per_video, [video.index for video in ranked[:top_k]])
        text = format_ranking(ranked)
        return shown(best, text, text=f"{reward.name}, best first:\n{text}", node=node_id(cls))


NODES = [RewardModelLoader, RewardCombine, RewardScoreFrames, RewardRankCandidates]
