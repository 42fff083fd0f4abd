import hashlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".cache" / "pkgroot"))  # import the repo as `easyanimate_reward`
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_NAMES = {"v5": "tiny-EasyAnimateV5-zh-InP", "v5.1": "tiny-EasyAnimateV5.1-zh-InP"}


def _tiny_cache_dir() -> Path:
    # Rebuilt only when the code that writes them changes.
    digest = hashlib.sha1((REPO / "easyanimate" / "tiny.py").read_bytes()).hexdigest()[:12]
    return REPO / ".cache" / "tiny-models" / digest


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """{"v5": folder, "v5.1": folder}: tiny random models in the real layouts (built once, cached)."""
    from easyanimate_reward.easyanimate.tiny import write_tiny_model

    root = _tiny_cache_dir()
    out = {}
    for version, name in TINY_NAMES.items():
        folder = root / name
        if not (folder / "model_index.json").is_file():
            write_tiny_model(folder, version)
        out[version] = folder
    return out


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_models):
    """One real ComfyUI server for the whole test session, with the pack and tiny models installed."""
    from host import ComfyServer, install_models

    base = tmp_path_factory.mktemp("comfy_base")
    server = ComfyServer(base)
    server.prepare_base()
    install_models(base, {TINY_NAMES[v]: p for v, p in tiny_models.items()})
    server.start()
    yield server
    server.stop()
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "comfy_server.log").write_text(server.log_tail(2_000_000))
