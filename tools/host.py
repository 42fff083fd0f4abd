"""Drive the real ComfyUI host (0.3.75, unpacked by scripts/bootstrap.sh) over its HTTP API.

`ComfyServer` starts `main.py --cpu` on a free loopback port with its own base directory, links the
pack into custom_nodes/, and stops the server by its own pid. Used by the tests, by the demo job
(scripts/run_example.py) and by `tools.workflows write` / `check` without --url. No ComfyUI import:
the host runs in its own process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib import error, request

REPO = Path(__file__).resolve().parents[1]
HOST_DIR = REPO / ".cache" / "comfyui"
PACK_NAME = "ComfyUI-EasyAnimate-Reward"  # a Manager-style folder name: the pack must not depend on it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, port: int | None = None, log_path: Path | None = None):
        self.base = Path(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or self.base / "server.log"
        self.proc: subprocess.Popen | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def prepare_base(self) -> None:
        for sub in ("custom_nodes", "models", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)

    def start(self, timeout: float = 180) -> "ComfyServer":
        if not (HOST_DIR / "main.py").is_file():
            raise RuntimeError(f"ComfyUI host missing at {HOST_DIR}: run scripts/bootstrap.sh")
        self.prepare_base()
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--base-directory", str(self.base), "--listen", "127.0.0.1",
             "--port", str(self.port), "--disable-api-nodes", "--disable-auto-launch"],
            cwd=HOST_DIR, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group, nothing else
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- HTTP --------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, payload: dict | None, timeout: float = 30):
        data = json.dumps(payload or {}).encode()
        req = request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def queue(self, graph: dict) -> dict:
        """POST /prompt. Returns the server's JSON: prompt_id, or error + node_errors for a bad graph."""
        status, body = self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        body = body or {}
        body["http_status"] = status
        return body

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; log:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 600) -> dict:
        queued = self.queue(graph)
        if "prompt_id" not in queued:
            raise AssertionError(f"graph rejected: {json.dumps(queued, indent=1)[:4000]}")
        return self.wait(queued["prompt_id"], timeout)

    def interrupt(self) -> None:
        self.post("/interrupt", {})


def history_error(entry: dict) -> str | None:
    """The exception message of a failed prompt in /history, or None if it succeeded."""
    status = entry.get("status", {})
    if status.get("status_str") != "error":
        return None
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return "error (no message)"


def install_models(base: Path, tiny_models: dict[str, Path]) -> None:
    """Symlink tiny model folders into BASE/models/EasyAnimate/."""
    dest = base / "models" / "EasyAnimate"
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in tiny_models.items():
        link = dest / name
        if link.is_symlink() or link.exists():
            continue
        link.symlink_to(src, target_is_directory=True)
