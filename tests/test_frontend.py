"""The example workflows in the real ComfyUI front end, driven in headless Chromium over the DevTools
protocol (tools/frontend.py): every UI-format file loads with all node types known (no red "missing"
nodes, no missing-nodes dialog), and the front end's own UI -> API conversion (graphToPrompt, what the
Queue button sends) gives exactly the API-format file. Each file opens readable: at the view it
stores (scale >= MIN_SCALE, every node on screen), no node covering another (previews included), and
a widget fed by a primitive node showing that node's value. Every workflow has its template-browser
thumbnail (workflows/<name>.jpg, made by `python -m easyanimate_reward.tools.thumbnails`). One
screenshot per workflow goes to test-artifacts/frontend/.

Needs Debian's chromium: run scripts/install_browser.sh.
"""

from __future__ import annotations

import pytest
from PIL import Image

from easyanimate_reward.tools import workflows
from easyanimate_reward.tools.frontend import chromium_path, front_end
from easyanimate_reward.tools.layout import PRIMITIVES
from easyanimate_reward.tools.thumbnails import thumbnail_path

ARTIFACTS = workflows.REPO / "test-artifacts" / "frontend"
MIN_SCALE = 0.7  # node text (14 px) is drawn at 10 px or more, above the front end's low-detail cut-off
# The trainer node is being split into smaller nodes; its workflow gets its final layout then.


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
    if chromium_path() is None:
        pytest.fail("Chromium is not installed: run scripts/install_browser.sh (Debian's chromium + chromium-driver)")
    with front_end(comfy_server) as tools:
        yield tools


def _overlaps(a, b) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


@pytest.mark.parametrize("name", workflows.workflow_names())
def test_workflow_opens_in_the_front_end(browser, object_info, name):
    ui = workflows.load_ui(name)
    report = browser.load_workflow(ui, name)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.screenshot(ARTIFACTS / f"{name}.png")

    assert report["notRegistered"] == [], f"node types unknown to the front end: {report['notRegistered']}"
    errors = [n for n in report["nodes"] if n["hasErrors"]]
    assert errors == [], f"nodes drawn as missing/broken: {errors}"
    assert not any("missing" in d.lower() for d in report["dialogs"]), report["dialogs"]
    assert sorted(n["id"] for n in report["nodes"]) == sorted(n["id"] for n in ui["nodes"])
    # The front end's own conversion (what the Queue button sends) equals the shipped API file.
    assert server_inputs_only(report["output"], object_info) == workflows.load_api(name)


@pytest.mark.parametrize("name", workflows.workflow_names())
def test_workflow_opens_readable(browser, name):
    ui = workflows.load_ui(name)
    report = browser.load_workflow(ui, name)
    view = report["view"]
    # The front end opens at the stored view (not a fit-to-everything zoom) and that view is readable.
    assert view["scale"] == pytest.approx(ui["extra"]["ds"]["scale"])
    assert view["scale"] >= MIN_SCALE, view
    # Every node on screen, at the sizes the front end gave them.
    for node in report["nodes"]:
        x, y, w, h = node["bounds"]
        left, top = (x + view["offset"][0]) * view["scale"], (y + view["offset"][1]) * view["scale"]
        right, bottom = left + w * view["scale"], top + h * view["scale"]
        assert left >= 0 and top >= 0 and right <= view["width"] and bottom <= view["height"], (node["type"], view)
    # No node covers another (so no preview is hidden under a node).
    nodes = report["nodes"]
    covered = [(a["type"], b["type"]) for i, a in enumerate(nodes) for b in nodes[i + 1:]
               if _overlaps(a["bounds"], b["bounds"])]
    assert covered == [], covered
    # A widget fed by a primitive node shows the value that arrives, not the schema default.
    by_id = {n["id"]: n for n in report["nodes"]}
    ui_nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        for entry in node.get("inputs") or []:
            widget = (entry.get("widget") or {}).get("name")
            if widget is None or entry.get("link") is None:
                continue
            source = ui_nodes[links[entry["link"]][1]]
            if source["type"] in PRIMITIVES:
                shown = dict(by_id[node["id"]]["widgetValues"])[widget]
                assert shown == source["widgets_values"][0], (node["type"], widget, shown)


@pytest.mark.parametrize("name", workflows.workflow_names())
def test_every_workflow_has_a_thumbnail(name):
    path = thumbnail_path(name)
    assert path.is_file(), f"{path} missing: run python -m easyanimate_reward.tools.thumbnails"
    with Image.open(path) as image:
        assert image.format == "JPEG"
        image.verify()
    with Image.open(path) as image:
        image.load()
        assert image.size[0] >= 480 and image.size[1] >= 300, image.size
        assert len(set(image.convert("L").resize((32, 20)).getdata())) > 8  # a picture, not a blank page


def test_the_host_serves_the_thumbnails_where_the_template_browser_looks(comfy_server):
    from urllib import request

    import host

    for name in workflows.workflow_names():
        # The front end's getTemplateThumbnailUrl for a custom node's template: /api/workflow_templates/<pack>/<name>.jpg
        with request.urlopen(f"{comfy_server.url}/api/workflow_templates/{host.PACK_NAME}/{name}.jpg", timeout=30) as r:
            assert r.read(3) == b"\xff\xd8\xff", name  # JPEG start-of-image marker
