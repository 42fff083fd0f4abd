import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".cache" / "pkgroot"))  # import the repo as `easyanimate_reward`
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """{"v5": folder, "v5.1": folder}: tiny random models in the real layouts (built once, cached)."""
    from easyanimate_reward.easyanimate.tiny import cached_tiny_models

    return cached_tiny_models(REPO / ".cache" / "tiny-models")


@pytest.fixture(scope="session")
def tiny_variants() -> dict[str, Path]:
    """{"v5-t2v", "v5.1-t2v", "v5-control", "v5.1-control", "v5.1-camera": folder}: the other model
    kinds (text-to-video, Control, Control-Camera) as tiny random models in the real layouts."""
    from easyanimate_reward.easyanimate.tiny import cached_tiny_variants

    return cached_tiny_variants(REPO / ".cache" / "tiny-models")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_models, tiny_variants):
    """One real ComfyUI server for the whole test session, with the pack and tiny models installed."""
    from host import ComfyServer, install_models

    base = tmp_path_factory.mktemp("comfy_base")
    server = ComfyServer(base)
    server.prepare_base()
    from easyanimate_reward.easyanimate.tiny import TINY_NAMES, TINY_VARIANT_NAMES

    install_models(base, {TINY_NAMES[v]: p for v, p in tiny_models.items()})
    install_models(base, {TINY_VARIANT_NAMES[k]: p for k, p in tiny_variants.items()})
    server.start()
    yield server
    server.stop()
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "comfy_server.log").write_text(server.log_tail(2_000_000))
