"""The sampler's new inputs on the real host: flow multistep schedulers with shift, TeaCache,
cfg-skip, and latent previews sent with the progress bar over the websocket."""

import io
import json
import struct
import uuid

from PIL import Image

from host import history_error
from test_host_foundation import t2v_graph

V51 = "tiny-EasyAnimateV5.1-zh-InP"
PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA = 1, 4  # the host's protocol.BinaryEventTypes


def run_listening(server, graph: dict, timeout: float = 600):
    """Queue `graph` as a websocket client; return (history entry, binary frames received)."""
    import websocket  # websocket-client (requirements-dev.txt)

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=timeout)
    try:
        status, body = server.post("/prompt", {"prompt": graph, "client_id": client_id})
        assert status == 200 and "prompt_id" in body, body
        frames = []
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                frames.append(message)
                continue
            data = json.loads(message)
            if data["type"] in ("executing", "execution_error", "execution_interrupted") and \
                    data["data"].get("prompt_id") == body["prompt_id"] and \
                    (data["type"] != "executing" or data["data"].get("node") is None):
                break
    finally:
        ws.close()
    return server.wait(body["prompt_id"]), frames


def preview_images(frames: list[bytes]) -> list[Image.Image]:
    images = []
    for frame in frames:
        kind = struct.unpack(">I", frame[:4])[0]
        if kind == PREVIEW_IMAGE:  # 4-byte image type, then the JPEG
            images.append(Image.open(io.BytesIO(frame[8:])))
        elif kind == PREVIEW_IMAGE_WITH_METADATA:  # 4-byte metadata length, metadata JSON, then the image
            length = struct.unpack(">I", frame[4:8])[0]
            images.append(Image.open(io.BytesIO(frame[8 + length:])))
    return images


def test_object_info_lists_the_new_sampler_inputs(comfy_server):
    sampler = comfy_server.object_info()["EasyAnimateReward_Sampler"]["input"]
    schedulers = sampler["required"]["scheduler"]
    options = schedulers[0] if isinstance(schedulers[0], list) else schedulers[1]["options"]
    assert {"Flow", "Flow UniPC", "Flow DPM++", "PNDM"} <= set(options)
    assert {"shift", "teacache", "teacache_threshold", "cfg_skip_ratio", "preview_every"} <= set(sampler["optional"])


def test_previews_are_sent_with_the_progress_bar(comfy_server):
    graph = t2v_graph(V51, frames=9, seed=11, extra_sampler={"steps": 4, "preview_every": 2, "width": 48})
    entry, frames = run_listening(comfy_server, graph)
    assert history_error(entry) is None, history_error(entry)
    images = preview_images(frames)
    assert len(images) == 2, len(frames)  # steps 2 and 4
    sizes = [im.size for im in images]
    # 3 latent frames of 6 x 4 side by side (the host scales the image to fit --preview-size)
    assert all(im.format == "JPEG" and abs(w / h - 18 / 4) < 0.05 for im, (w, h) in zip(images, sizes)), sizes
    graph = t2v_graph(V51, frames=9, seed=11, extra_sampler={"steps": 4, "preview_every": 0, "width": 48})
    entry, frames = run_listening(comfy_server, graph)
    assert history_error(entry) is None and preview_images(frames) == []


def test_flow_multistep_teacache_and_cfg_skip_through_the_server(comfy_server):
    outputs = {}
    for name, extra in {
        "plain": {},
        "unipc": {"scheduler": "Flow UniPC", "shift": 5.0},
        "dpm": {"scheduler": "Flow DPM++"},
        "teacache": {"teacache": True, "teacache_threshold": 0.5, "steps": 8},
        "cfg_skip": {"cfg_skip_ratio": 0.5},
    }.items():
        entry = comfy_server.run(t2v_graph(V51, seed=12, extra_sampler={"steps": 8, **extra}))
        assert history_error(entry) is None, (name, history_error(entry))
        image = entry["outputs"]["3"]["images"][0]
        path = comfy_server.base / "output" / image["subfolder"] / image["filename"]
        outputs[name] = Image.open(path).convert("RGB").tobytes()  # pixels only (the PNG also holds the graph)
    assert len(set(outputs.values())) == len(outputs)  # every option changed the video
    entry = comfy_server.run(t2v_graph("tiny-EasyAnimateV5-zh-InP", seed=12, extra_sampler={"shift": 3.0}))
    assert "flow-matching (V5.1) models only" in (history_error(entry) or "")
