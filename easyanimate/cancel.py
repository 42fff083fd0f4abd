"""Cooperative cancellation for the core's long loops, without knowing who asks for it.

Every long loop in `easyanimate/`, `reward/` and `training/` (sampling steps, VAE chunks and tiles,
reward batches, training steps, file writes of many tensors) calls `check_cancel()` between units
of work. The host adapter installs its own check once (ComfyUI: raise when the user pressed Cancel);
plain Python and the CLI may install one for a block with `cancel_check(...)`, or none at all.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

_process_check: Callable[[], None] | None = None
_local = threading.local()


def install_cancel_check(check: Callable[[], None] | None) -> None:
    """Process-wide check (the host adapter calls this once at start-up). None removes it."""
    global _process_check
    _process_check = check


@contextmanager
def cancel_check(check: Callable[[], None]) -> Iterator[None]:
    """Add `check` for the current thread while the block runs (tests, CLI, nested callers)."""
    stack = getattr(_local, "stack", ())
    _local.stack = stack + (check,)
    try:
        yield
    finally:
        _local.stack = stack


def check_cancel() -> None:
    """Raise whatever the installed checks raise when cancellation was requested; else return."""
    if _process_check is not None:
        _process_check()
    for check in getattr(_local, "stack", ()):
        check()
