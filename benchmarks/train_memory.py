"""Peak memory and step time of one reward-backprop step vs the number of sampling steps T, for
truncated backprop (`last`, `tail 10`) and full backprop (`all`), side by side.

CPU (default): a small random transformer (bigger than the test one, so activations are
measurable) and the tiny VAE. Each configuration runs in its own subprocess, so the peak RSS of one
does not hide in the heap another left behind; RSS is sampled by a thread every millisecond. The
bytes autograd saves for backward (unique storages, via saved_tensors_hooks) are counted exactly.

GPU (`--gpu`): a 12b-shaped transformer (48 layers, 48 heads x 64 = 3072 wide; `--layers N` for
fewer), random bf16 weights, the full-size Magvit VAE, 256x256x49 frames, random text embeddings
(V5.1 width 3584), gradient checkpointing on; torch.cuda.max_memory_allocated per configuration.

    python benchmarks/train_memory.py                 # CPU table
    python benchmarks/train_memory.py --gpu --layers 48
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".cache" / "pkgroot"))

STRATEGIES = {"last": ("last", 1), "tail 10": ("tail", 10), "full": ("all", 1)}
STEP_COUNTS = (10, 20, 40)


def build_pipe(device: str, dtype: torch.dtype, gpu_shape: bool, layers: int):
    from diffusers import AutoencoderKLMagvit, EasyAnimateTransformer3DModel

    from easyanimate_reward.easyanimate.memory import ModulePlacement
    from easyanimate_reward.easyanimate.model import EasyAnimatePipe
    from easyanimate_reward.easyanimate.tiny import build_tiny_vae

    torch.manual_seed(0)
    if gpu_shape:  # diffusers' defaults are the 12b V5.1 shapes
        config = dict(in_channels=33, out_channels=16, patch_size=2, num_layers=layers, mmdit_layers=layers)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                transformer = EasyAnimateTransformer3DModel(**config)
                vae = AutoencoderKLMagvit()
        finally:
            torch.set_default_dtype(previous)
    else:
        transformer = EasyAnimateTransformer3DModel(
            num_attention_heads=4, attention_head_dim=32, in_channels=33, out_channels=16, patch_size=2,
            num_layers=layers, mmdit_layers=layers, time_embed_dim=64, text_embed_dim=64, text_embed_dim_t5=None,
            sample_width=8, sample_height=8)
        vae = build_tiny_vae()
    transformer.to(device, dtype).requires_grad_(False).eval()
    vae.to(device, dtype).requires_grad_(False).eval()
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                 "beta_end": 0.02, "beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False,
                 "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}
    return EasyAnimatePipe(folder="(random)", version="v5.1", transformer=transformer, vae=vae, text_encoder=None,
                           tokenizer=None, text_encoder_2=None, tokenizer_2=None, scheduler_config=scheduler,
                           dtype=dtype, placement=ModulePlacement("none", device))


class SavedBytes:
    """Bytes of distinct storages autograd saves for backward during the block, leaving out the
    weights themselves (they exist anyway): the activations a truncated rollout keeps."""

    def __init__(self, modules=()):
        self.storages: dict[int, int] = {}
        self.weights = {t.untyped_storage().data_ptr() for m in modules for t in list(m.parameters()) + list(m.buffers())}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval, self.peak, self.running = interval, 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def one_step(pipe, settings, steps, strategy, k, text_tokens, text_width, count_saved: bool):
    """Rollout + reward + backward. Returns (seconds, saved bytes or 0)."""
    from easyanimate_reward.easyanimate.text import TextConditioning
    from easyanimate_reward.reward.simple import SaturationReward
    from easyanimate_reward.training.config import select_grad_steps
    from easyanimate_reward.training.lora_layers import LoraLayers
    from easyanimate_reward.training.rollout import reward_loss, rollout_video, video_rewards

    device = pipe.compute_device
    generator = torch.Generator("cpu").manual_seed(1)
    cond = TextConditioning(torch.randn(1, text_tokens, text_width, generator=generator).to(device, pipe.dtype))
    uncond = TextConditioning(torch.randn(1, text_tokens, text_width, generator=generator).to(device, pipe.dtype))
    lora = LoraLayers(pipe.transformer, rank=16, alpha=16, device=device).attach(pipe.transformer)
    saved = SavedBytes([pipe.transformer, pipe.vae, lora])
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        grad_steps = lambda total: select_grad_steps(strategy, total, k)  # noqa: E731
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if count_saved else None
        if hooks is not None:
            hooks.__enter__()
        try:
            video = rollout_video(pipe, settings, cond, uncond, [0], grad_steps)
            loss = reward_loss(video_rewards(SaturationReward().to(device), video, ["x"], 1))
        finally:
            if hooks is not None:
                hooks.__exit__(None, None, None)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, saved.total
    finally:
        lora.detach()


def cpu_child(args) -> None:
    """One configuration in this process; prints a JSON line."""
    from easyanimate_reward.training.rollout import RolloutSettings

    torch.set_num_threads(args.threads)
    pipe = build_pipe("cpu", torch.float32, False, args.layers)
    settings = RolloutSettings(width=args.size, height=args.size, frames=args.frames, sampling_steps=args.steps,
                               guidance_scale=6.0)
    strategy, k = STRATEGIES[args.strategy]
    one_step(pipe, RolloutSettings(args.size, args.size, args.frames, 2, 6.0), 2, "all", 1, 32, 64, False)  # warm-up
    import gc

    gc.collect()
    sampler = RssSampler()
    baseline = sampler.process.memory_info().rss
    sampler.start()
    seconds, _ = one_step(pipe, settings, args.steps, strategy, k, 32, 64, False)
    peak = sampler.stop()
    again, saved = one_step(pipe, settings, args.steps, strategy, k, 32, 64, True)
    # The faster of two runs: on a shared machine a single run can be slowed down many times over.
    print(json.dumps({"strategy": args.strategy, "steps": args.steps, "seconds": min(seconds, again),
                      "peak_rss_delta": peak - baseline, "saved_bytes": saved}))


def run_cpu(args) -> list[dict]:
    rows = []
    for steps in STEP_COUNTS:
        for name in STRATEGIES:
            cmd = [sys.executable, __file__, "--child", "--strategy", name, "--steps", str(steps),
                   "--layers", str(args.layers), "--size", str(args.size), "--frames", str(args.frames),
                   "--threads", str(args.threads)]
            # A fixed mmap threshold: glibc then returns every large tensor to the OS when it is freed,
            # so RSS follows the tensors instead of the high-water mark of an earlier allocation.
            env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="65536")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  done {name} T={steps}: {rows[-1]['seconds']:.2f} s", file=sys.stderr)
    return rows


def run_gpu(args) -> list[dict]:
    from easyanimate_reward.training.rollout import RolloutSettings, enable_gradient_checkpointing

    pipe = build_pipe("cuda", torch.bfloat16, True, args.layers)
    enable_gradient_checkpointing(pipe)
    weights = torch.cuda.memory_allocated()
    print(f"transformer {args.layers} layers: {sum(p.numel() for p in pipe.transformer.parameters()) / 1e9:.2f} B params, "
          f"{weights / 2**30:.1f} GiB with the VAE", file=sys.stderr)
    rows = []
    for steps in STEP_COUNTS:
        settings = RolloutSettings(256, 256, 49, steps, 6.0)
        for name, (strategy, k) in STRATEGIES.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                seconds, _ = one_step(pipe, settings, steps, strategy, k, 256, 3584, False)
                peak = torch.cuda.max_memory_allocated()
                row = {"strategy": name, "steps": steps, "seconds": seconds, "peak_bytes": peak,
                       "above_weights": peak - weights}
            except torch.OutOfMemoryError:
                row = {"strategy": name, "steps": steps, "seconds": float("nan"), "peak_bytes": None,
                       "above_weights": None, "oom": True}
            rows.append(row)
            print(f"  done {name} T={steps}: {row}", file=sys.stderr)
    return rows


def table(rows: list[dict], memory_key: str, memory_label: str, extra_key: str | None = None) -> str:
    def mib(v):
        return "OOM" if v is None else f"{v / 2**20:,.1f}"

    lines = []
    header = f"{'T':>4} | " + " | ".join(f"{name:>26}" for name in STRATEGIES)
    lines.append(f"{memory_label} (MiB){' / saved-for-backward (MiB)' if extra_key else ''} and step time (s)")
    lines.append(header)
    lines.append("-" * len(header))
    by = {(r["strategy"], r["steps"]): r for r in rows}
    for steps in STEP_COUNTS:
        cells = []
        for name in STRATEGIES:
            r = by[(name, steps)]
            mem = mib(r[memory_key]) + (f" / {mib(r[extra_key])}" if extra_key else "")
            cells.append(f"{mem + '  ' + format(r['seconds'], '.2f') + ' s':>26}")
        lines.append(f"{steps:>4} | " + " | ".join(cells))
    lines.append("")
    lines.append("ratios vs `last` at the same T (memory, time):")
    for steps in STEP_COUNTS:
        base = by[("last", steps)]
        parts = []
        for name in ("tail 10", "full"):
            r = by[(name, steps)]
            if r[memory_key] is None or not base[memory_key]:
                parts.append(f"{name}: OOM")
                continue
            parts.append(f"{name}: x{r[memory_key] / base[memory_key]:.2f} mem"
                         + (f" (saved x{r[extra_key] / max(base[extra_key], 1):.1f})" if extra_key else "")
                         + f", x{r['seconds'] / base['seconds']:.2f} time")
        lines.append(f"  T={steps}: " + "; ".join(parts))
    return "\n".join(lines)


def gpu_targets(rows: list[dict], limit_bytes: float = 80e9, flat_tolerance: float = 0.10) -> str:
    """The issue's two GPU targets: every truncated configuration's whole peak (weights included)
    within 80 GB, and its memory above the weights flat in T (largest within 10% of smallest)."""
    lines = ["", "targets: peak torch.cuda.max_memory_allocated, weights included (GB = 1e9 bytes), <= 80 GB;"
             " truncated modes flat in T (within 10%):"]
    for name in STRATEGIES:
        mine = [r for r in rows if r["strategy"] == name]
        peaks = " / ".join("OOM" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1e9:.1f}" for r in mine)
        line = f"  {name:<8} T={'/'.join(str(r['steps']) for r in mine)}: {peaks} GB"
        if name != "full":
            fits = all(r["peak_bytes"] is not None and r["peak_bytes"] <= limit_bytes for r in mine)
            above = [r["above_weights"] for r in mine if r["above_weights"] is not None]
            flat = len(above) == len(mine) and max(above) <= (1 + flat_tolerance) * min(above)
            spread = f"{max(above) / min(above) - 1:+.1%}" if len(above) == len(mine) and min(above) > 0 else "n/a"
            line += f"  [<= 80 GB: {'yes' if fits else 'NO'}; flat: {'yes' if flat else 'NO'} (max/min - 1 = {spread})]"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="12b-shaped transformer on CUDA")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (CPU default 4, GPU 48)")
    parser.add_argument("--size", type=int, default=64, help="CPU: width = height")
    parser.add_argument("--frames", type=int, default=5, help="CPU: frames")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (1 is steadier when other processes share the cores)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="last", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.layers = args.layers or 4
        cpu_child(args)
        return
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA")
        args.layers = args.layers or 48
        rows = run_gpu(args)
        print(f"\nGPU {torch.cuda.get_device_name()}: {args.layers}-layer 3072-wide transformer, 256x256x49, cfg 6, "
              "gradient checkpointing, bf16, LoRA rank 16 on every Linear, 1 decoded latent")
        print(table(rows, "above_weights", "peak above weights"))
        print(gpu_targets(rows))
    else:
        args.layers = args.layers or 4
        rows = run_cpu(args)
        print(f"\nCPU ({args.threads} threads): {args.layers}-layer 128-wide transformer, {args.size}x{args.size}x"
              f"{args.frames}, cfg 6, fp32, no checkpointing, LoRA rank 16 on every Linear, 1 decoded latent")
        print(table(rows, "peak_rss_delta", "peak RSS increase", "saved_bytes"))
    print("\nmedian step time per sampling step:",
          ", ".join(f"{name} {statistics.median(r['seconds'] / r['steps'] for r in rows if r['strategy'] == name):.3f} s"
                    for name in STRATEGIES))


if __name__ == "__main__":
    main()
