"""The example workflows in the real ComfyUI front end, driven in headless Chromium over the DevTools
protocol: every UI-format file loads with all node types known (no red "missing" nodes, no missing-
nodes dialog), and the front end's own UI -> API conversion (graphToPrompt, what the Queue button
sends) gives exactly the API-format file. One screenshot per workflow goes to
test-artifacts/frontend/.

Needs Debian's chromium: run scripts/install_browser.sh.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib import request

import pytest

from easyanimate_reward.tools import workflows

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "frontend"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1920,1200",
]


def chromium_path() -> str:
    chosen = os.environ.get("CHROMIUM")  # the same override scripts/install_browser.sh honours
    for candidate in (chosen and shutil.which(chosen), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("Chromium is not installed: run scripts/install_browser.sh (Debian's chromium + chromium-driver)")


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

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()  # our own chromium only
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# Skip the first-run template browser and draw node text at any zoom, so screenshots show the graph.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 1,
                     "Comfy.Minimap.Visible": False}

# Loads one workflow and reports what the front end made of it. `registered` is the exact check the
# front end's loadGraphData uses to list missing node types; a node it could not create is a plain
# LGraphNode with has_errors set (drawn red).
LOAD_JS = """
(async () => {
  const workflow = %s;
  const notRegistered = workflow.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
  await app.loadGraphData(workflow, true, true, %s);
  const nodes = app.graph.nodes.map(n => ({id: n.id, type: n.type, hasErrors: !!n.has_errors,
                                           widgets: (n.widgets || []).length}));
  const prompt = await app.graphToPrompt();
  const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300));
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));  // its fitView runs here
  return JSON.stringify({notRegistered, nodes, output: prompt.output, dialogs});
})()
"""


def server_inputs_only(prompt: dict, object_info: dict) -> dict:
    """Drop inputs the server's schema does not have: front-end extensions add widgets of their own
    (PreviewAny's "preview" box) that graphToPrompt sends along and the server ignores."""
    out = {}
    for node_id, node in prompt.items():
        schema = workflows.node_schema(object_info, node["class_type"])
        known = {spec.name for spec in schema.inputs}
        out[node_id] = dict(node, inputs={k: v for k, v in node["inputs"].items() if k in known})
    return out


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def browser(comfy_server):
    binary = chromium_path()
    comfy_server.post("/settings", FRONTEND_SETTINGS)
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    tools = DevTools(binary, profile)
    try:
        tools.call("Page.enable")
        tools.call("Page.navigate", url=comfy_server.url + "/")
        tools.wait_for("!!(window.app && window.app.graph && window.LiteGraph && "
                       "LiteGraph.registered_node_types['EasyAnimateReward_Sampler'])")
        yield tools
    finally:
        tools.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.parametrize("name", workflows.workflow_names())
def test_workflow_opens_in_the_front_end(browser, object_info, name):
    ui = workflows.load_ui(name)
    report = json.loads(browser.evaluate(LOAD_JS % (json.dumps(ui), json.dumps(f"{name}.json"))))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    time.sleep(0.5)  # let the canvas draw
    browser.call("Runtime.evaluate", expression="app.canvas.draw(true, true)")
    browser.screenshot(ARTIFACTS / f"{name}.png")

    assert report["notRegistered"] == [], f"node types unknown to the front end: {report['notRegistered']}"
    errors = [n for n in report["nodes"] if n["hasErrors"]]
    assert errors == [], f"nodes drawn as missing/broken: {errors}"
    assert not any("missing" in d.lower() for d in report["dialogs"]), report["dialogs"]
    assert sorted(n["id"] for n in report["nodes"]) == sorted(n["id"] for n in ui["nodes"])
    # The front end's own conversion (what the Queue button sends) equals the shipped API file.
    assert server_inputs_only(report["output"], object_info) == workflows.load_api(name)
