"""The real-host runner lives in the shipped tools/host.py (the demo job uses it too); the tests
import it under its old name `host`."""

from easyanimate_reward.tools.host import (  # noqa: F401
    HOST_DIR,
    PACK_NAME,
    REPO,
    ComfyServer,
    free_port,
    history_error,
    install_models,
)
