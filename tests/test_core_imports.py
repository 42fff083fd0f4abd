"""The core packages work from plain Python: importing every module of easyanimate/, reward/ and
training/ in a fresh interpreter loads nothing of the ComfyUI host."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = r"""
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
imported = []
for package in ("easyanimate", "reward", "training"):
    root = importlib.import_module("easyanimate_reward." + package)
    imported.append(root.__name__)
    for info in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
        imported.append(info.name)
host = sorted(m for m in sys.modules
              if m.split(".")[0] in ("folder_paths", "server", "comfy_api", "comfy_execution", "execution", "nodes")
              or m.split(".")[0].startswith("comfy"))
print(json.dumps({"imported": imported, "host": host}))
"""


def test_core_packages_import_nothing_of_the_host():
    out = subprocess.run([sys.executable, "-c", _PROBE, str(REPO / ".cache" / "pkgroot")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    # The walk really covered the core (guards against an empty probe passing trivially).
    assert "easyanimate_reward.training.trainer" in result["imported"]
    assert "easyanimate_reward.reward.hps" in result["imported"]
    assert "easyanimate_reward.easyanimate.sampling" in result["imported"]
    assert result["host"] == [], f"core modules pulled in host modules: {result['host']}"
