"""Per-step time of reward training with 1 vs 2 processes, and the share of it spent in
communication (the LoRA gradient all-reduce and the held-out gather), on CPU with the tiny model.

Three runs of the same trainer (training/trainer.py + training/distributed.py), each in fresh
processes (torchrun on 127.0.0.1, gloo):
  1 process  x batch 1   (the work of one rank alone)
  1 process  x batch 2   (the global batch of the 2-process run, in one process)
  2 processes x batch 1  (data-parallel: same global batch as the second run)
The first `--warmup` steps are not timed. Communication = time inside the collectives, measured
on rank 0 (on CPU they are synchronous; on GPUs the benchmark synchronises after each one).

    .venv/bin/python benchmarks/distributed_step.py            # CPU, tiny model, ~3 min on 2 cores
    .venv/bin/python benchmarks/distributed_step.py --size 64 --steps 8

On 2 CPU cores, 2 processes also share the cores with each other (and with anything else
running), so the CPU figures say what the coordination costs, not how GPUs scale. Unmeasured
here: NCCL all-reduce time of a real-size LoRA (12b, rank 128) between GPUs, multi-GPU step
time and its scaling to 8 GPUs (the official recipe), and DeepSpeed's launcher on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".cache" / "pkgroot"))


def worker(args) -> None:
    import torch

    from easyanimate_reward.easyanimate.loading import load_pipe
    from easyanimate_reward.easyanimate.model import EasyAnimateModel
    from easyanimate_reward.easyanimate.tiny import cached_tiny_models
    from easyanimate_reward.reward.simple import SaturationReward
    from easyanimate_reward.training.config import TrainConfig
    from easyanimate_reward.training.distributed import DataParallel
    from easyanimate_reward.training.trainer import RewardLoRATrainer

    torch.set_num_threads(1)
    dist = DataParallel.from_environment("cpu")
    model = cached_tiny_models(REPO / ".cache" / "tiny-models")["v5.1"]
    pipe = load_pipe(model, "fp32", "none", device="cpu")
    config = TrainConfig(width=args.size, height=args.size, frames=5, sampling_steps=args.sampling_steps,
                         cfg=6.0, rank=8, alpha=8.0, learning_rate=1e-3, train_steps=args.steps,
                         batch_size=args.batch, save_every=0, seed=0, backprop="tail", backprop_k=2,
                         gradient_checkpointing=False)
    prompts = [f"prompt number {i}" for i in range(16)]
    times, comms = [], []
    last = {"comm": 0.0}

    def on_step(report):
        times.append(report.seconds)
        comms.append(dist.comm_seconds - last["comm"])
        last["comm"] = dist.comm_seconds

    RewardLoRATrainer(EasyAnimateModel(pipe), SaturationReward(), prompts, config, on_step=on_step,
                      distributed=dist).train()
    if dist.is_main:
        Path(args.result).write_text(json.dumps({"times": times, "comms": comms, "world": dist.world_size}))
    dist.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, batch: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker",
                   "--batch", str(batch), "--result", str(result), "--steps", str(args.steps),
                   "--size", str(args.size), "--sampling-steps", str(args.sampling_steps)]
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                   PYTHONPATH=str(REPO / ".cache" / "pkgroot"))
        subprocess.run(command, env=env, check=True, timeout=args.timeout, capture_output=True)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (incl. warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--size", type=int, default=32, help="video width = height (tiny model)")
    parser.add_argument("--sampling-steps", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for procs, batch in ((1, 1), (1, 2), (2, 1)):
        data = run(procs, batch, args)
        times, comms = data["times"][args.warmup:], data["comms"][args.warmup:]
        step = statistics.median(times)
        share = sum(comms) / sum(times) if sum(times) else 0.0
        rows.append((procs, batch, procs * batch, step, statistics.median(comms), share))
    print(f"reward training step, tiny V5.1, {args.size}x{args.size}x5, {args.sampling_steps} sampling steps, "
          f"CPU (gloo), median of {args.steps - args.warmup} steps after {args.warmup} warm-up")
    print(f"{'processes':>9} {'batch/rank':>10} {'global batch':>12} {'s/step':>8} {'comm s/step':>11} {'comm share':>10}")
    for procs, batch, total, step, comm, share in rows:
        print(f"{procs:>9} {batch:>10} {total:>12} {step:>8.3f} {comm:>11.4f} {share:>9.1%}")
    one, same, two = rows[0][3], rows[1][3], rows[2][3]
    print(f"2 processes vs 1 process at the same global batch (2): {same / two:.2f}x the throughput; "
          f"vs 1 process x batch 1: {two / one:.2f}x the step time for twice the videos")
    print("unmeasured here: NCCL all-reduce of a real-size LoRA between GPUs, multi-GPU step time and scaling "
          "to 8 GPUs, DeepSpeed's launcher on GPUs")


if __name__ == "__main__":
    main()
