"""Peak RAM of a fused LoRA under the offload memory modes: patched on the device as weights move
in (this pack now, like ComfyUI) vs patched in place in RAM with CPU backups (the pack before).

Each variant runs in a fresh process: it builds a transformer with 12b-like blocks (3072 wide,
48 heads x 64, feed-forward 12288, text width 3584; `--layers` blocks) in bf16 on the CPU, a
random LoRA (rank 128, alpha 64) on every Linear (the official coverage), and applies it fused at
strength 0.7 as the sampler does before the transformer moves in (`sync_loras`), then a
strength change to 0.4. A thread samples the process RSS every 5 ms; the figure is the peak RSS
above the interpreter's own (measured before the model is built), divided by the weights' bytes.
The LoRA's own tensors (about 8% of the weights at rank 128) are part of that peak in both.

On a GPU host the patched copies are made in VRAM as modules move in; this benchmark has no GPU,
so it measures the RAM side up to that point (what a desktop's RAM must hold), labelled
"simulated device". Target: at most 1.1x the weights.

    .venv/bin/python benchmarks/fused_lora_ram.py [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from tables import markdown_table  # benchmarks/tables.py


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(variant: str, layers: int) -> dict:
    import torch
    from diffusers import EasyAnimateTransformer3DModel

    from easyanimate_reward.easyanimate.lora_format import weights_from_tensors
    from easyanimate_reward.easyanimate.lora_patch import get_patcher
    from easyanimate_reward.easyanimate.memory import ModulePlacement
    from easyanimate_reward.easyanimate.model import AppliedLora

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    baseline = _rss()
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    torch.set_default_dtype(torch.bfloat16)
    transformer = EasyAnimateTransformer3DModel(
        num_attention_heads=48, attention_head_dim=64, in_channels=33, out_channels=16, patch_size=2,
        time_embed_dim=512, text_embed_dim=3584, text_embed_dim_t5=None, num_layers=layers, mmdit_layers=layers,
        sample_width=16, sample_height=16).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for path, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear):
            tensors[path] = ((torch.randn(128, m.in_features, generator=g) * 0.01).bfloat16(),
                             (torch.randn(m.out_features, 128, generator=g) * 0.01).bfloat16())
    weights = weights_from_tensors(tensors, 64.0)
    del tensors
    lora_bytes = sum(t.numel() * t.element_size() for mod in weights.modules.values() for t in (mod.up, mod.down))
    placement = ModulePlacement("model_cpu_offload", "cpu")
    placement.force_patch_on_move = variant == "on_move"

    class Pipe:
        pass

    pipe = Pipe()
    pipe.placement, pipe.lora_patcher = placement, None
    patcher = get_patcher(pipe)
    before = _rss()
    peak[0] = before
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    patcher.sync(transformer, [AppliedLora("l", weights, 0.7)])
    patcher.sync(transformer, [AppliedLora("l", weights, 0.4)])
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    return {"variant": variant, "weights_gib": weight_bytes / 2**30, "lora_gib": lora_bytes / 2**30,
            "peak_over_interpreter_gib": (peak[0] - baseline) / 2**30,
            "ratio": (peak[0] - baseline) / weight_bytes, "backup_gib": patcher.backup_bytes / 2**30,
            "sync_seconds": seconds, "patch_on_move": patcher.patch_on_move}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--child", choices=["in_place", "on_move"])
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.layers)))
        return 0
    rows = []
    for variant in ("in_place", "on_move"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--layers", str(args.layers)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"fused LoRA (rank 128, every Linear) under model_cpu_offload, {args.layers} 12b-like blocks, "
          f"bf16 weights {rows[0]['weights_gib']:.2f} GiB, LoRA {rows[0]['lora_gib']:.2f} GiB "
          "(simulated device: RAM side only)")
    names = {"in_place": "patched in RAM + backups (before)", "on_move": "patched on the device as it moves in (now)"}
    print(markdown_table(
        ("variant", "peak RSS above interpreter (GiB)", "x weights", "x weights, LoRA tensors aside",
         "CPU backups (GiB)", "sync 0.7 + 0.4 (s)"),
        ((names[r["variant"]], f"{r['peak_over_interpreter_gib']:.2f}", f"{r['ratio']:.2f}",
          f"{(r['peak_over_interpreter_gib'] - r['lora_gib']) / r['weights_gib']:.2f}", f"{r['backup_gib']:.2f}",
          f"{r['sync_seconds']:.1f}") for r in rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
