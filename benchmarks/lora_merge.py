"""LoRA merge / strength change / restore: this pack's patcher vs the naive reload-and-merge.

Builds a transformer with 12b-like blocks (3072 wide: 48 heads x 64, feed-forward 4 x 3072 =
12288, time embedding 512, text_proj input 3584) and a few layers, bf16 weights on CPU, and a
random official-format LoRA (rank 128, alpha 64) on every Linear. Then, in one process:

  ours : load_lora_file once, then LoraPatcher.sync (fused): first merge, strength 0.7 -> 0.4,
         restore.
  naive: what EasyAnimate's own nodes do: re-read the LoRA file from disk and, per key, cast the
         layer to float32, add multiplier * scale * up @ down, cast back; a strength change
         unmerges the old strength (file re-read, subtract) and merges the new one.

Reports wall time and peak RSS growth of each phase, the speed-up of a strength change, and the
max abs drift of the base weights after 100 strength changes and a final removal, for both.

Then the strength change 0.7 -> 0.4 against what users actually have, timed interleaved (every
repeat runs each path once, in rotating order; median and spread min..max are reported):
  ours        : LoraPatcher.sync (fused), file parsed once.
  comfy       : ComfyUI's own ModelPatcher (from the host copy in .cache/comfyui): patches from
                comfy.lora.load_lora computed once (its LoraLoader caches the file); a strength
                change unpatches the old clone (restores its backup) and patches a new clone.
  lora_cache  : EasyAnimate's official path with its lora_cache (the LoRA state dict kept in
                memory): unmerge the old strength, merge the new one, per key in float32.
  reread      : the same, re-reading the file for each merge (EasyAnimate's slowest path).

`--device cuda`: the transformer's weights live on the GPU (as under gpu_memory_mode "none") and are
patched there; our backups stay in CPU RAM (as LoraPatcher keeps them), the naive path moves each
LoRA pair to the GPU and merges there (as EasyAnimate's nodes do). Phases are timed with
torch.cuda.synchronize() and also report the peak CUDA allocation (torch.cuda.max_memory_allocated)
above what was allocated when the phase began. Reference snapshots are kept in CPU RAM.

    .venv/bin/python benchmarks/lora_merge.py [--layers 4] [--threads N] Default run (2 blocks): about 2 minutes on 2 idle CPU cores, ~3 GB RAM; --layers 6 fits in ~8 GB.
    python benchmarks/lora_merge.py --device cuda --layers 48     # the whole 12b (24 GB bf16 on the GPU)
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from easyanimate_reward.easyanimate.keymap import diffusers_to_original
from easyanimate_reward.easyanimate.lora_format import flat_name_table, load_lora_file
from easyanimate_reward.easyanimate.lora_patch import LoraPatcher
from easyanimate_reward.easyanimate.model import AppliedLora

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples RSS every few ms on a thread; `growth` = peak during the block - RSS at its start.
    On a CUDA device the block is bracketed by synchronize() (so the time covers the queued kernels)
    and `cuda_growth` = peak CUDA allocation during the block - allocation at its start."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.cuda_growth = self.cuda_peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = torch.cuda.memory_allocated()
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.003)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        if self.cuda:
            self.cuda_peak = torch.cuda.max_memory_allocated()
            self.cuda_growth = self.cuda_peak - self.cuda_start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.growth = self.peak - self.start


def build_transformer(layers: int, device: torch.device | str = "cpu", heads: int = 48) -> nn.Module:
    from diffusers import EasyAnimateTransformer3DModel

    with torch.device("meta"):
        model = EasyAnimateTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=64, in_channels=33, out_channels=16, patch_size=2,
            num_layers=layers, mmdit_layers=layers, time_embed_dim=512, text_embed_dim=3584,
        )
    # Materialised (and filled) where it will live: on CUDA the 12b never passes through CPU RAM.
    model = model.to_empty(device=device)
    nn.Module.to(model, torch.bfloat16)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    return model.eval()


def write_random_lora(model: nn.Module, path: Path, rank: int, alpha: float) -> int:
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            key = "lora_unet__" + diffusers_to_original(name).replace(".", "_")
            state[key + ".lora_down.weight"] = (torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5).bfloat16()
            state[key + ".lora_up.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.01).bfloat16()
            state[key + ".alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    save_file(state, str(path))
    return len(state) // 3


# -- the naive approach (EasyAnimate's own nodes), written out here ----------------------------


def naive_merge(model: nn.Module, lora_path: Path | None, multiplier: float, table: dict[str, str],
                state: dict | None = None, only: set[str] | None = None) -> None:
    """Re-read the file (unless `state` is given) and add multiplier * scale * up @ down per key,
    with the layer cast to float32 for the addition and back afterwards."""
    if state is None:
        state = load_file(str(lora_path))
    groups: dict[str, dict] = defaultdict(dict)
    for key, value in state.items():
        layer, part = key.split(".", 1)
        groups[layer][part] = value
    for layer, parts in groups.items():
        path = table[layer[len("lora_unet__"):]]  # (the original resolves names by a greedy walk)
        if only is not None and path not in only:
            continue
        module = model.get_submodule(path)
        dtype = module.weight.dtype
        up = parts["lora_up.weight"].to(module.weight.device, torch.float32)
        down = parts["lora_down.weight"].to(module.weight.device, torch.float32)
        scale = parts["alpha"].item() / up.shape[1]
        module.to(torch.float32)
        module.weight.data += multiplier * scale * torch.mm(up, down)
        module.to(dtype)


def naive_unmerge(model, lora_path, multiplier, table, state=None, only=None):
    naive_merge(model, lora_path, -multiplier, table, state, only)


# ----------------------------------------------------------------------------------------------


def snapshot(model: nn.Module, only: set[str] | None = None) -> dict[str, torch.Tensor]:
    # Always a CPU copy: two snapshots of a 12b beside the model would not fit on one GPU.
    return {n: m.weight.detach().to("cpu", copy=True) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (only is None or n in only)}


def max_drift(model: nn.Module, reference: dict[str, torch.Tensor]) -> tuple[float, int]:
    worst, changed = 0.0, 0
    for name, ref in reference.items():
        w = model.get_submodule(name).weight
        ref = ref.to(w.device)
        diff = (w.float() - ref.float()).abs().max().item()
        worst = max(worst, diff)
        changed += int((w != ref).sum().item())
    return worst, changed


def comfy_model_patcher(model: nn.Module, lora_path: Path, table: dict[str, str]):
    """(base ModelPatcher, patches) from the real ComfyUI in .cache/comfyui, or None if absent."""
    import sys

    host = Path(__file__).resolve().parents[1] / ".cache" / "comfyui"
    if not (host / "comfy" / "model_patcher.py").is_file():
        return None
    sys.path.insert(0, str(host))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.lora
    import comfy.model_patcher

    class Holder(nn.Module):  # ComfyUI's models hold the network as .diffusion_model
        def __init__(self, inner):
            super().__init__()
            self.diffusion_model = inner

    key_map = {"lora_unet__" + flat: f"diffusion_model.{path}.weight" for flat, path in table.items()}
    patches = comfy.lora.load_lora(load_file(str(lora_path)), key_map, log_missing=False)
    device = next(model.parameters()).device
    return comfy.model_patcher.ModelPatcher(Holder(model), device, device), patches


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def interleaved_strength_changes(model, weights, lora_path: Path, table: dict[str, str], repeats: int,
                                 device: torch.device) -> dict[str, list[float]]:
    """Seconds of one strength change 0.7 -> 0.4 per path and repeat (set-up and removal untimed)."""
    patcher = LoraPatcher()
    state = load_file(str(lora_path))
    comfy = comfy_model_patcher(model, lora_path, table)
    held = {}

    def ours_setup():
        patcher.sync(model, (AppliedLora("r", weights, 0.7),))

    def ours_change():
        patcher.sync(model, (AppliedLora("r", weights, 0.4),))

    def ours_teardown():
        patcher.sync(model, ())

    def comfy_setup():
        base, patches = comfy
        held["p"] = base.clone()
        held["p"].add_patches(patches, 0.7)
        held["p"].patch_model(device_to=device)

    def comfy_change():
        base, patches = comfy
        held["p"].unpatch_model(device_to=device)
        held["p"] = base.clone()
        held["p"].add_patches(patches, 0.4)
        held["p"].patch_model(device_to=device)

    def comfy_teardown():
        held.pop("p").unpatch_model(device_to=device)

    paths = {
        "ours": (ours_setup, ours_change, ours_teardown),
        "lora_cache": (lambda: naive_merge(model, None, 0.7, table, state),
                       lambda: (naive_unmerge(model, None, 0.7, table, state), naive_merge(model, None, 0.4, table, state)),
                       lambda: naive_unmerge(model, None, 0.4, table, state)),
        "reread": (lambda: naive_merge(model, lora_path, 0.7, table),
                   lambda: (naive_unmerge(model, lora_path, 0.7, table), naive_merge(model, lora_path, 0.4, table)),
                   lambda: naive_unmerge(model, lora_path, 0.4, table)),
    }
    if comfy is not None:
        paths["comfy"] = (comfy_setup, comfy_change, comfy_teardown)
    else:
        print("  (ComfyUI not found in .cache/comfyui: the ModelPatcher row is skipped)")
    names = list(paths)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            setup, change, teardown = paths[name]
            setup()
            synchronize(device)
            start = time.perf_counter()
            change()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            teardown()
    return times


def print_interleaved(model, weights, lora_path, table, repeats, device) -> None:
    print(f"\nstrength change 0.7 -> 0.4, {repeats} interleaved repeats (median, spread min..max):")
    times = interleaved_strength_changes(model, weights, lora_path, table, repeats, device)
    ours_median = median(times["ours"])
    labels = {"ours": "ours (LoraPatcher, fused)", "comfy": "ComfyUI ModelPatcher (clone + patch)",
              "lora_cache": "EasyAnimate lora_cache (in memory)", "reread": "EasyAnimate re-read file"}
    for name, t in times.items():
        ratio = "" if name == "ours" else f"   ours is {median(t) / ours_median:.1f}x faster"
        print(f"  {labels[name]:<38} median {median(t):7.3f} s, spread {min(t):.3f}..{max(t):.3f} s{ratio}")


def fmt_row(label: str, probe: PeakRSS) -> str:
    row = f"  {label:<34} {probe.seconds:8.2f} s   peak RSS +{probe.growth / 2**20:8.0f} MiB"
    if probe.cuda:
        row += f"   peak CUDA +{probe.cuda_growth / 2**20:8.0f} MiB (max allocated {probe.cuda_peak / 2**30:.2f} GiB)"
    return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (each ~490 MB in bf16)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--changes", type=int, default=100, help="strength changes for the drift measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the strength-change comparison")
    parser.add_argument("--heads", type=int, default=48, help="attention heads of 64 (48 = the 12b's width 3072)")
    parser.add_argument("--interleaved-only", action="store_true",
                        help="only the interleaved strength-change comparison (skip the single-shot phases)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the transformer's weights live (backups always stay in CPU RAM)")
    return parser.parse_args(argv)


def single_shot_phases(model, lora_path: Path, table, base, device):
    """Load, first merge, strength change and restore, ours then naive, with the speed-ups and the
    naive drift after one round trip. Returns the loaded LoRA."""
    print("\nours (LoraPatcher, fused):")
    patcher = LoraPatcher()
    with PeakRSS(device) as load:
        weights = load_lora_file(lora_path, model)
    print(fmt_row("load + validate file (once)", load))
    with PeakRSS(device) as ours_first:
        patcher.sync(model, (AppliedLora("r", weights, 0.7),))
    print(fmt_row("(a) first merge at 0.7", ours_first))
    with PeakRSS(device) as ours_change:
        patcher.sync(model, (AppliedLora("r", weights, 0.4),))
    print(fmt_row("(b) strength 0.7 -> 0.4", ours_change))
    ours_04 = snapshot(model)
    backup_gib = patcher.backup_bytes / 2**30
    with PeakRSS(device) as ours_restore:
        patcher.sync(model, ())
    print(fmt_row("(c) restore", ours_restore))
    print(f"  CPU backup held while patched: {backup_gib:.2f} GiB (freed on restore: "
          f"{patcher.backup_bytes / 2**30:.2f} GiB left)")
    drift_ours, _ = max_drift(model, base)
    assert drift_ours == 0.0

    print("\nnaive (re-read file, merge per key; unmerge by subtracting):")
    with PeakRSS(device) as naive_first:
        naive_merge(model, lora_path, 0.7, table)
    print(fmt_row("(a) first merge at 0.7", naive_first))
    with PeakRSS(device) as naive_change:
        naive_unmerge(model, lora_path, 0.7, table)
        naive_merge(model, lora_path, 0.4, table)
    print(fmt_row("(b) strength 0.7 -> 0.4", naive_change))
    naive_vs_ours, _ = max_drift(model, ours_04)
    with PeakRSS(device) as naive_restore:
        naive_unmerge(model, lora_path, 0.4, table)
    print(fmt_row("(c) restore (unmerge)", naive_restore))
    naive_after_one, changed_one = max_drift(model, base)

    print(f"\nstrength change speed-up: {naive_change.seconds / ours_change.seconds:.1f}x "
          f"(naive {naive_change.seconds:.2f} s / ours {ours_change.seconds:.2f} s; target >= 3x)")
    print(f"first merge speed-up:     {naive_first.seconds / ours_first.seconds:.1f}x")
    print(f"restore speed-up:         {naive_restore.seconds / ours_restore.seconds:.1f}x")
    print(f"naive 0.4 weights vs ours: max abs diff {naive_vs_ours:.3g}")
    print(f"after one merge/change/unmerge the naive base has drifted: max abs {naive_after_one:.3g}, "
          f"{changed_one} of {sum(t.numel() for t in base.values())} weights changed")
    return weights


def _restore_base(model, base) -> None:
    for name, t in base.items():
        model.get_submodule(name).weight.data.copy_(t)


def print_drift(model, weights, lora_path: Path, table, base, device, changes: int) -> None:
    """Drift after many strength changes, ours vs naive, on a subset of full-width modules (quick)."""
    drift_set = {"transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.add_k_proj"}
    rng = random.Random(0)
    strengths = [round(rng.uniform(0.1, 1.0), 3) for _ in range(changes)]
    sub_weights = type(weights)({p: weights.modules[p] for p in drift_set}, source=weights.source)
    _restore_base(model, base)  # start both from the exact base
    patcher = LoraPatcher()
    synchronize(device)
    t0 = time.perf_counter()
    for s in strengths:
        patcher.sync(model, (AppliedLora("r", sub_weights, s),))
    patcher.sync(model, ())
    synchronize(device)
    ours_loop = time.perf_counter() - t0
    drift_ours, changed_ours = max_drift(model, {n: base[n] for n in drift_set})

    state = load_file(str(lora_path))  # arithmetic only: skip the disk reads in this loop
    synchronize(device)
    t0 = time.perf_counter()
    previous = None
    for s in strengths:
        if previous is not None:
            naive_unmerge(model, None, previous, table, state, drift_set)
        naive_merge(model, None, s, table, state, drift_set)
        previous = s
    naive_unmerge(model, None, previous, table, state, drift_set)
    synchronize(device)
    naive_loop = time.perf_counter() - t0
    drift_naive, changed_naive = max_drift(model, {n: base[n] for n in drift_set})
    n_drift = sum(base[n].numel() for n in drift_set)
    print(f"\nafter {changes} strength changes + removal ({len(drift_set)} full-width modules, "
          f"{n_drift / 1e6:.0f} M weights):")
    print(f"  ours : max abs drift {drift_ours:.3g}, {changed_ours} weights differ from the base "
          f"({ours_loop:.1f} s)")
    print(f"  naive: max abs drift {drift_naive:.3g}, {changed_naive} weights differ from the base "
          f"({naive_loop:.1f} s)")
    del state, sub_weights
    gc.collect()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA build of torch and a visible GPU")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)} "
              f"({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)")
    model = build_transformer(args.layers, device, args.heads)
    params = sum(p.numel() for p in model.parameters())
    print(f"transformer: {args.layers} blocks of width {64 * args.heads} (ff {256 * args.heads}), {params / 1e6:.0f} M params, "
          f"{params * 2 / 2**30:.2f} GiB bf16")
    table = flat_name_table(model)
    with tempfile.TemporaryDirectory() as tmp:
        lora_path = Path(tmp) / "reward_lora.safetensors"
        n_modules = write_random_lora(model, lora_path, args.rank, args.alpha)
        print(f"LoRA: rank {args.rank}, alpha {args.alpha:g}, {n_modules} Linear modules, "
              f"{lora_path.stat().st_size / 2**20:.0f} MiB on disk (in the page cache)")
        base = snapshot(model)
        if args.interleaved_only:
            weights = load_lora_file(lora_path, model)
            print_interleaved(model, weights, lora_path, table, args.repeats, device)
            return
        weights = single_shot_phases(model, lora_path, table, base, device)
        # strength change vs what users actually have, interleaved repeats
        print_interleaved(model, weights, lora_path, table, args.repeats, device)
        _restore_base(model, base)  # back to the exact base before the drift loop
        print_drift(model, weights, lora_path, table, base, device, args.changes)
        del weights
        gc.collect()


if __name__ == "__main__":
    main()
