"""The demo job: run an example workflow end to end on the real ComfyUI host, offline, on tiny models.

Builds the tiny EasyAnimate models (cached in .cache/tiny-models/), starts ComfyUI 0.3.75 with this
pack on a free port and a base folder in out/example/, submits workflows/api/<workflow>.json through
POST /prompt after `tools.workflows.tinyfy` (tiny models, 32x32, 5 frames, 3 steps; everything else
as shipped), prints where the outputs were written and stops the server.

    .venv/bin/python scripts/run_example.py [--workflow 01_text_to_video] [--base out/example]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".cache" / "pkgroot"))  # the repo as the package `easyanimate_reward`

from easyanimate_reward.easyanimate.tiny import TINY_NAMES, cached_tiny_models  # noqa: E402
from easyanimate_reward.tools import workflows  # noqa: E402
from easyanimate_reward.tools.host import ComfyServer, history_error, install_models  # noqa: E402

def tiny_models() -> dict[str, Path]:
    """Tiny model folders in the real layouts, in the same cache the tests use."""
    print("[example] tiny models (built once, then cached in .cache/tiny-models/)")
    return {TINY_NAMES[v]: folder for v, folder in cached_tiny_models(REPO / ".cache" / "tiny-models").items()}


def saved_files(server: ComfyServer, outputs: dict) -> list[Path]:
    files = []
    for node_output in outputs.values():
        for key in ("images", "gifs", "videos"):
            for item in node_output.get(key, []) if isinstance(node_output, dict) else []:
                if isinstance(item, dict) and "filename" in item:
                    files.append(server.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"])
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an example workflow on the real ComfyUI host with tiny models.")
    parser.add_argument("--workflow", default="01_text_to_video", choices=workflows.workflow_names())
    parser.add_argument("--base", type=Path, default=REPO / "out" / "example", help="ComfyUI base folder")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)

    base = args.base.resolve()
    server = ComfyServer(base)
    server.prepare_base()
    install_models(base, tiny_models())
    graph = workflows.tinyfy(workflows.load_api(args.workflow), TINY_NAMES, workflows.TINY_LORAS,
                             {"EasyAnimateReward_RewardLoRATrainer": {"lora_name": "example_trained_reward_lora"}})
    workflows.install_tiny_assets(base, graph)

    print(f"[example] starting ComfyUI (base {base}, log {server.log_path})")
    started = time.time()
    with server:
        print(f"[example] server up at {server.url} after {time.time() - started:.0f} s; "
              f"queueing workflows/api/{args.workflow}.json (tiny)")
        queued = time.time()
        entry = server.run(graph, timeout=args.timeout)
        error = history_error(entry)
        if error:
            print(f"[example] FAILED: {error}\n{server.log_tail(4000)}", file=sys.stderr)
            return 1
        files = [f for f in saved_files(server, entry["outputs"]) if f.is_file()]
        print(f"[example] done in {time.time() - queued:.1f} s")
        for node_id, output in entry["outputs"].items():
            if "text" in output:
                print(f"[example] node {node_id}: {''.join(output['text'])}")
    if not files:
        print("[example] FAILED: the workflow wrote no files", file=sys.stderr)
        return 1
    for path in files:
        print(f"[example] wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
