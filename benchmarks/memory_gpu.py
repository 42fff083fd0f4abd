"""A few cells of benchmarks/memory_table.py measured for real on one CUDA GPU.

Real-size modules with random weights (no weights exist on our machines), the same phase functions
as the simulation (the pack's predict_noise / decode_latents / the trainer's step), run on real
tensors: each cell prints torch.cuda.max_memory_allocated above what was allocated before it, next
to the LiveBytes counter of the simulation on the same run, and the simulated figure from fake
tensors where one was computed (`--simulated out/memory_table.json`).

    python benchmarks/memory_gpu.py [--simulated out/memory_table.json]   # about 5 minutes on an H100/H200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_table as m  # noqa: E402

GIB = 2**30
DENOISE_CELLS = ((384, 672, 49), (768, 1344, 49))
DECODE_CELLS = ((384, 672, 49, False), (384, 672, 49, True), (768, 1344, 49, True))


def on_gpu(phase_fn, *args):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    phase = phase_fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, phase, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulated", default=None, help="memory_table.py --json output, for the comparison")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--no-training", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    simulated = json.loads(Path(args.simulated).read_text()) if args.simulated and Path(args.simulated).is_file() else {}
    sim_phases = simulated.get("models", {}).get("V5.1-12b", {}).get("phases", {})
    sim_vae = simulated.get("vae", {})
    torch.cuda.set_device(0)
    m.TRANSFORMERS["gpu"] = dict(m.TRANSFORMERS["V5.1-12b"], num_layers=args.layers, mmdit_layers=args.layers)
    m.VERSIONS["gpu"] = "v5.1"
    with torch.device("cuda"):
        parts = {"transformer": m.build_transformer("gpu"), "vae": m.build_vae(), "text_encoder": None,
                 "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}
    pipe = m.make_pipe("gpu", "none", parts, "cuda")
    print(f"GPU {torch.cuda.get_device_name()}: V5.1-12b-shaped transformer ({args.layers} layers, random bf16, "
          f"{m.module_bytes(parts['transformer']) / GIB:.2f} GiB) + Magvit VAE; peak above the weights (GiB)")
    print(f"{'cell':<34} {'cuda peak':>10} {'counter':>10} {'simulated':>10} {'seconds':>8}")

    def row(label, peak, phase, sim, seconds):
        sim_text = f"{sim / GIB:10.2f}" if sim else f"{'-':>10}"
        print(f"{label:<34} {peak / GIB:10.2f} {phase.activations / GIB:10.2f} {sim_text} {seconds:8.1f}", flush=True)

    with torch.device("cuda"):
        for h, w, f in DENOISE_CELLS:
            peak, phase, s = on_gpu(m.phase_denoise, pipe, h, w, f)
            row(f"denoise step (CFG) {h}x{w}x{f}", peak, phase, sim_phases.get(f"denoise|{h}|{w}|{f}"), s)
        for h, w, f, tiled in DECODE_CELLS:
            peak, phase, s = on_gpu(m.phase_decode, pipe, h, w, f, tiled)
            row(f"VAE decode {h}x{w}x{f} {'tiled' if tiled else 'untiled'}", peak, phase,
                sim_vae.get(f"decode|{tiled}|{h}|{w}|{f}"), s)
    if not args.no_training:
        del parts, pipe
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.device("cuda"):
            rows = m.simulate_training("gpu", (m.TRAIN_VARIANTS[0],), log=lambda *_: None, fake=False,
                                      device="cuda")
        r = rows[0]
        print(f"training step 256x256x49 ({r['label']}): cuda peak {torch.cuda.max_memory_allocated() / GIB:.1f} GiB "
              f"in all (counter: weights {r['weights'] / GIB:.1f} + {r['activations'] / GIB:.1f}; "
              f"{'failed: ' + r['error'] if r['error'] else 'ok'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
