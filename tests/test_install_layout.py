"""The pack as a user installs it: a clone in a folder with any name (hyphenated, as the Manager
makes them), the headless trainer run from ComfyUI's root with relative paths, no development link."""

import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _copy_checkout(dest: Path) -> None:
    """The files a clone of the current checkout has (tracked, and new files not ignored)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_documented_headless_command_runs_from_a_hyphenated_clone(tmp_path, tiny_models):
    root = tmp_path / "ComfyUI"
    pack = root / "custom_nodes" / "ComfyUI-EasyAnimate-Reward"
    _copy_checkout(pack)
    shutil.copytree(tiny_models["v5"], root / "models" / "EasyAnimate" / "tiny-v5")
    (root / "input").mkdir()
    (root / "input" / "prompts.txt").write_text("a red fox in the snow\n")
    (root / "models" / "loras").mkdir(parents=True)
    cmd = [sys.executable, "custom_nodes/ComfyUI-EasyAnimate-Reward/train.py",
           "--model", "models/EasyAnimate/tiny-v5", "--reward", "saturation", "--prompts", "input/prompts.txt",
           "--lora-name", "models/loras/fox.safetensors", "--precision", "fp32", "--memory-mode", "none",
           "--device", "cpu", "--width", "32", "--height", "32", "--frames", "5", "--sampling-steps", "2",
           "--rank", "2", "--alpha", "2", "--train-steps", "1", "--no-gradient-checkpointing"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # The code that ran is the clone's own (found through the launcher, not an installed copy).
    assert f"easyanimate_reward from {pack.resolve()}" in done.stderr
    weights = load_file(root / "models" / "loras" / "fox.safetensors")
    assert any(k.startswith("lora_unet__") for k in weights)
