"""The real ComfyUI front end in headless Chromium, driven over the DevTools protocol: open the page
of a running server, load a UI workflow the way the front end does, read back what it made of it
(node types, sizes, the canvas view, the graph it would queue), and take screenshots.

Used by tests/test_frontend.py and by the thumbnails command (tools/thumbnails.py). Needs Debian's
chromium (scripts/install_browser.sh) and websocket-client (requirements-dev.txt).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib import request

WINDOW = (1920, 1200)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
]

# Skip the first-run template browser and draw node text at any zoom, so screenshots show the graph.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 1,
                     "Comfy.Minimap.Visible": False}

# Loads one workflow and reports what the front end made of it. `registered` is the exact check the
# front end's loadGraphData uses to list missing node types; a node it could not create is a plain
# LGraphNode with has_errors set (drawn red). `bounds`: each node's box on the canvas (title bar
# included) after the front end sized it; `view`: the canvas scale and offset and its size in pixels.
LOAD_JS = """
(async () => {
  const workflow = %s;
  const notRegistered = workflow.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
  await app.loadGraphData(workflow, true, true, %s);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));  // a fitView would run here
  const nodes = app.graph.nodes.map(n => ({id: n.id, type: n.type, hasErrors: !!n.has_errors,
                                           widgets: (n.widgets || []).length,
                                           widgetValues: (n.widgets || []).map(w => [w.name, w.value]),
                                           bounds: Array.from(n.getBounding ? n.getBounding() :
                                                   [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0],
                                                    n.size[1] + LiteGraph.NODE_TITLE_HEIGHT])}));
  const prompt = await app.graphToPrompt();
  const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300));
  const canvas = app.canvas.canvas;
  const view = {scale: app.canvas.ds.scale, offset: Array.from(app.canvas.ds.offset),
                width: canvas.clientWidth, height: canvas.clientHeight};
  return JSON.stringify({notRegistered, nodes, output: prompt.output, dialogs, view});
})()
"""


def chromium_path() -> str | None:
    chosen = os.environ.get("CHROMIUM")  # the same override scripts/install_browser.sh honours
    for candidate in (chosen and shutil.which(chosen), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class DevTools:
    """Just enough of the Chrome DevTools protocol: evaluate JS in the page, take screenshots."""

    def __init__(self, binary: str, profile: Path):
        import websocket  # websocket-client (requirements-dev.txt)

        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-allow-origins=*", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {json.dumps(result['exceptionDetails'])[:2000]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.evaluate(expression):
                return
            time.sleep(0.25)
        raise TimeoutError(f"page never satisfied: {expression}")

    def screenshot(self, path: Path, format: str = "png", quality: int = 85, scale: float = 1.0,
                   region: tuple[float, float, float, float] | None = None) -> None:
        """The window (or `region` = x, y, width, height of it), scaled by `scale`."""
        params = {"format": format}
        if format == "jpeg":
            params["quality"] = quality
        if scale != 1.0 or region is not None:
            x, y, width, height = region or (0, 0, *WINDOW)
            params["clip"] = {"x": x, "y": y, "width": width, "height": height, "scale": scale}
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.write_bytes(base64.b64decode(data))

    def load_workflow(self, ui: dict, name: str) -> dict:
        """Load a UI workflow as the front end's own file open does; what it made of it (LOAD_JS)."""
        report = json.loads(self.evaluate(LOAD_JS % (json.dumps(ui), json.dumps(f"{name}.json"))))
        time.sleep(0.5)  # let the canvas draw
        self.call("Runtime.evaluate", expression="app.canvas.draw(true, true)")
        return report

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()  # our own chromium only
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextmanager
def front_end(server) -> Iterator[DevTools]:
    """Chromium on `server`'s front end (a tools/tests host.ComfyServer), the pack's nodes registered."""
    binary = chromium_path()
    if binary is None:
        raise RuntimeError("Chromium is not installed: run scripts/install_browser.sh "
                           "(Debian's chromium + chromium-driver), or set CHROMIUM")
    server.post("/settings", FRONTEND_SETTINGS)
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    tools = DevTools(binary, profile)
    try:
        tools.call("Page.enable")
        tools.call("Page.navigate", url=server.url + "/")
        tools.wait_for("!!(window.app && window.app.graph && window.LiteGraph && "
                       "LiteGraph.registered_node_types['EasyAnimateReward_Sampler'])")
        yield tools
    finally:
        tools.close()
        shutil.rmtree(profile, ignore_errors=True)
