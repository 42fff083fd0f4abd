"""Thumbnails of the example workflows for ComfyUI's template browser: `workflows/<name>.jpg`, a
screenshot of `workflows/<name>.json` opened in the real front end (headless Chromium, the view the
file stores). The template browser shows the JPEG beside the file of the same name.

    .venv/bin/python -m easyanimate_reward.tools.thumbnails [--url http://127.0.0.1:8188] [NAME ...]

Without --url it starts a ComfyUI server of its own (the pack linked in). Needs Chromium
(scripts/install_browser.sh). tests/test_frontend.py checks that every workflow has one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ..fileio import atomic_file
from . import workflows
from .frontend import front_end

SCALE = 0.5  # the graph of a 1920 x 1200 window at half size: 930 x 480
# The graph only (x, y, width, height in the window): below the front end's banner, tab bar and Run
# bar, right of its side bar (measured on the host's front end; the stored views leave this margin).
GRAPH_REGION = (60, 118, 1860, 960)
QUALITY = 82


def thumbnail_path(name: str) -> Path:
    return workflows.WORKFLOW_DIR / f"{name}.jpg"


def write_thumbnails(server, names: list[str] | None = None) -> list[Path]:
    written = []
    with front_end(server) as browser:
        for name in names or workflows.workflow_names():
            browser.load_workflow(workflows.load_ui(name), name)
            with atomic_file(thumbnail_path(name), suffix=".jpg") as tmp:
                browser.screenshot(tmp, format="jpeg", quality=QUALITY, scale=SCALE, region=GRAPH_REGION)
            written.append(thumbnail_path(name))
    return written


class _Remote:
    """A server someone else runs (--url): just the two calls front_end needs."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def post(self, path, payload):
        import json
        from urllib import request

        req = request.Request(self.url + path, data=json.dumps(payload).encode(),
                              headers={"Content-Type": "application/json"})
        with request.urlopen(req, timeout=30) as r:
            return r.status


def _own_server():
    from .host import ComfyServer

    return ComfyServer(Path(tempfile.mkdtemp(prefix="thumbnails-base-"))).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflows to photograph (default: all)")
    parser.add_argument("--url", help="a running ComfyUI server with this pack (default: start one)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(workflows.workflow_names()))
    if unknown:
        parser.error(f"unknown workflows: {unknown}")
    server = _Remote(args.url) if args.url else _own_server()
    try:
        for path in write_thumbnails(server, args.names or None):
            print(f"wrote {path}")
    finally:
        if not args.url:
            server.stop()
            shutil.rmtree(server.base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
