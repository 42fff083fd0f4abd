"""Reliability of the trainer and LoRA nodes on the real host (issue 9 items 1-4, 14, 16, 18; the
training-state part of issue 14): every order of sampling / training / sweeping on fused or
unfused LoRAs works, runs never replace files they did not create and keep their state out of
the LoRA lists, bad names and settings are refused before any work, Save Merged leaves a user's
folder alone, and the per-step progress text reaches the websocket."""

import asyncio
import json
import struct
import threading

import pytest

from easyanimate_reward.tools.workflows import write_tiny_lora
from host import history_error
from train_graph import trainer_graph
from test_training_host import MODEL, PROMPT, trainer_inputs

LORA = "reliability-lora.safetensors"
TEXT_EVENT = 3  # the host's protocol.BinaryEventTypes.TEXT (progress text)


@pytest.fixture(autouse=True)
def lora_file(comfy_server):
    path = comfy_server.base / "models" / "loras" / LORA
    if not path.is_file():
        write_tiny_lora("v5", path, seed=4)
    return path


def loader(memory_mode="none"):
    return {"class_type": "EasyAnimateReward_ModelLoader",
            "inputs": {"model": MODEL, "precision": "fp32", "gpu_memory_mode": memory_mode}}


def reward():
    return {"class_type": "EasyAnimateReward_RewardModelLoader", "inputs": {"kind": "saturation", "device": "cpu", "dtype": "float32"}}


def apply(strength, mode, model=("1", 0)):
    return {"class_type": "EasyAnimateReward_LoraApply",
            "inputs": {"model": list(model), "lora_name": LORA, "strength": strength, "mode": mode}}


def sampler(model_ref, seed=11):
    return {"class_type": "EasyAnimateReward_Sampler",
            "inputs": {"model": list(model_ref), "prompt": PROMPT, "negative_prompt": "", "width": 32, "height": 32,
                       "frames": 5, "steps": 2, "cfg": 1.0, "seed": seed, "scheduler": "auto", "videos": 1}}


def small_trainer(lora_name, node="3", **overrides) -> dict:
    """The trainer node `node` and its settings nodes (spread into a graph with **)."""
    inputs = trainer_inputs(lora_name, train_steps=1, sampling_steps=2, cfg=1.0, eval_prompts="", eval_every=0,
                            backprop="last", gradient_checkpointing=False)
    inputs.update(model=["2", 0], reward=["9", 0])
    inputs.update(overrides)
    return trainer_graph(node, inputs)


def final_node(kind, mode):
    if kind == "sampler":
        return {"3": sampler(("2", 0)), "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    if kind == "sweep":
        return {"9": reward(), "3": {"class_type": "EasyAnimateReward_StrengthSweep", "inputs": {
            "model": ["2", 0], "lora_name": LORA, "reward": ["9", 0], "prompt": PROMPT, "negative_prompt": "",
            "strengths": "0.3, 0.6", "width": 32, "height": 32, "frames": 5, "steps": 2, "cfg": 1.0, "seed": 1,
            "scheduler": "auto", "mode": mode, "batch_size": 4}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}}}
    return {"9": reward(), **small_trainer("combo/run"),
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}}}


def test_every_order_of_sampling_training_and_sweeping_on_applied_loras(comfy_server):
    """{sample first or not} x {fused, unfused} x {same or other strength} x {trainer, sweep, sampler}.
    Each combination starts on a freshly loaded pipe (the loader's memory mode alternates)."""
    failures, fresh = [], 0
    for first in (True, False):
        for mode in ("fused", "unfused"):
            for strength in (0.7, 0.5):
                for kind in ("trainer", "sweep", "sampler"):
                    fresh += 1
                    memory = ("none", "model_cpu_offload")[fresh % 2]  # another key: a new pipe
                    label = f"sample first={first} {mode} strength={strength} {kind}"
                    if first:
                        graph = {"1": loader(memory), "2": apply(0.7, mode), "3": sampler(("2", 0)),
                                 "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
                        err = history_error(comfy_server.run(graph))
                        if err:
                            failures.append(f"{label} (first sampler): {err}")
                            continue
                    graph = {"1": loader(memory), "2": apply(strength, mode), **final_node(kind, mode)}
                    err = history_error(comfy_server.run(graph))
                    if err:
                        failures.append(f"{label}: {err}")
    assert not failures, "\n".join(failures)


def run_files(server, run: str) -> dict:
    loras, runs = server.base / "models" / "loras", server.base / "output" / "easyanimate_reward_runs"
    return {"lora": loras / f"{run}.safetensors", "best": loras / f"{run}.best.safetensors",
            "folder": runs / run, "state": runs / run / "training_state.safetensors", "record": runs / run / "run.json"}


def test_runs_never_replace_files_and_keep_training_state_out_of_lora_lists(comfy_server):
    loras = comfy_server.base / "models" / "loras"
    write_tiny_lora("v5", loras / "keep me.safetensors", seed=5)  # a user's LoRA under the name asked for
    (loras / "keep me.best.safetensors").write_bytes(b"a stale .best of another run")
    before = (loras / "keep me.safetensors").read_bytes()
    graph = {"1": loader(), "2": apply(0.0, "fused"), "9": reward(),
             **small_trainer("keep me", eval_prompts="a dog", eval_every=1),
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}}}
    entry = comfy_server.run(graph)
    assert history_error(entry) is None, history_error(entry)
    assert (loras / "keep me.safetensors").read_bytes() == before
    assert (loras / "keep me.best.safetensors").read_bytes() == b"a stale .best of another run"
    first = run_files(comfy_server, "keep me_001")
    assert first["lora"].is_file() and first["state"].is_file() and "keep me_001.safetensors" in \
        entry["outputs"]["3"]["text"][0]
    record = json.loads(first["record"].read_text())
    assert record["step"] == 1 and record["lora_file"] == "keep me_001.safetensors"
    # Queued again (the shipped workflow re-queued): a new name, the first run untouched.
    kept = first["lora"].read_bytes()
    graph["3"]["inputs"]["seed"] = 4
    assert history_error(comfy_server.run(graph)) is None
    assert run_files(comfy_server, "keep me_002")["lora"].is_file() and first["lora"].read_bytes() == kept
    # Resume of that run writes on into its own files.
    graph.update(small_trainer("keep me_001", train_steps=2, resume_from="keep me_001.safetensors"))
    entry = comfy_server.run(graph)
    assert history_error(entry) is None, history_error(entry)
    record = json.loads(first["record"].read_text())
    assert record["step"] == 2 and record["history"]["step"] == [1, 2]
    assert not run_files(comfy_server, "keep me_003")["folder"].exists()


def test_training_state_stays_out_of_the_hosts_lora_lists_and_resume_finds_it(comfy_server):
    graph = {"1": loader(), "2": apply(0.0, "fused"), "9": reward(), **small_trainer("listed/state run"),
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}}}
    entry = comfy_server.run(graph)
    assert history_error(entry) is None, history_error(entry)
    native = comfy_server.object_info()["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "listed/state run.safetensors" in native
    ours = [n for n in native if n.startswith("listed/")]
    assert ours == ["listed/state run.safetensors"], ours  # the LoRA, and no training state
    files = run_files(comfy_server, "listed/state run")
    assert files["state"].is_file() and json.loads(files["record"].read_text())["state_file"] == files["state"].name
    graph.update(small_trainer("listed/state run", train_steps=2, resume_from="listed/state run.safetensors"))
    entry = comfy_server.run(graph)
    assert history_error(entry) is None, history_error(entry)
    log = comfy_server.log_tail(2_000_000)
    assert "restored AdamW state and float32 weights from" in log and str(files["state"]) in log
    assert json.loads(files["record"].read_text())["step"] == 2


def refused(server, name, **overrides) -> str | None:
    graph = {"1": loader(), "2": apply(0.0, "fused"), "9": reward(), **small_trainer(name, **overrides)}
    return history_error(server.run(graph))


def leftovers(server, marker: str) -> list:
    found = [p for p in (server.base / "models" / "loras").rglob("*") if marker in str(p)]
    return found + [p for p in (server.base / "output" / "easyanimate_reward_runs").rglob("*") if marker in str(p)]


def test_absolute_lora_names_are_refused(comfy_server):
    for name in ("/tmp/h1-absolute", "~/h1-home", "C:/h1-drive"):
        err = refused(comfy_server, name, train_steps=2)
        assert err is not None and "must be a relative path inside" in err, (name, err)
    assert not leftovers(comfy_server, "h1-"), "an absolute name became a subfolder"


def test_an_unwritable_lora_name_is_refused_before_training(comfy_server):
    name = "y" * 240  # the LoRA's name fits, its .best and temporary names do not
    err = refused(comfy_server, name, train_steps=7)  # a step count no other test uses
    assert err is not None and "cannot write" in err and ".best.safetensors" in err, err
    assert "RewardLoRATrainer: step 1/7" not in comfy_server.log_tail(2_000_000)  # no rollout ran
    assert not leftovers(comfy_server, "y" * 240)


def test_non_finite_trainer_settings_are_refused_before_any_work(comfy_server):
    # NaN passes the host's own min/max check (every comparison with NaN is False).
    for key, value in {"max_reward": "nan", "learning_rate": float("nan"), "loss_scale": float("nan")}.items():
        err = refused(comfy_server, f"refused-{key}", **{key: value})
        assert err is not None and key in err and "finite" in err, (key, err)
    err = refused(comfy_server, "refused-huge", max_reward="1e400")
    assert err is not None and "max_reward" in err and "finite" in err, err
    assert not leftovers(comfy_server, "refused-")


def test_save_merged_leaves_a_users_partial_folder_alone(comfy_server):
    root = comfy_server.base / "models" / "EasyAnimate"
    users = root / "merged-by-h1.partial"
    users.mkdir(exist_ok=True)
    (users / "notes.txt").write_text("mine")
    graph = {"1": loader(), "2": apply(0.7, "fused"),
             "3": {"class_type": "EasyAnimateReward_SaveMerged", "inputs": {"model": ["2", 0], "name": "merged-by-h1"}}}
    entry = comfy_server.run(graph)
    assert history_error(entry) is None, history_error(entry)
    assert (root / "merged-by-h1" / "transformer").is_dir()
    assert (users / "notes.txt").read_text() == "mine"


class TextFrames:
    """Listens on the host's websocket in a thread and keeps the progress-text binary frames."""

    def __init__(self, url: str):
        self.url = url.replace("http://", "ws://") + "/ws?clientId=h1-listener"
        self.frames: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    async def _listen(self):
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        message = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if message.type == aiohttp.WSMsgType.BINARY:
                        data = message.data
                        event, = struct.unpack(">I", data[:4])
                        if event == TEXT_EVENT:
                            size, = struct.unpack(">I", data[4:8])
                            self.frames.append((data[8:8 + size].decode(), data[8 + size:].decode()))
                    elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(30), "websocket did not connect"
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def test_training_progress_text_reaches_the_websocket(comfy_server):
    graph = {"1": loader(), "2": apply(0.0, "fused"), "9": reward(), **small_trainer("progress", train_steps=2),
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}}}
    with TextFrames(comfy_server.url) as listener:
        entry = comfy_server.run(graph)
    assert history_error(entry) is None, history_error(entry)
    texts = [text for node, text in listener.frames if node == "3"]
    assert any("step 1/2" in t and "reward" in t for t in texts), listener.frames
    assert any("step 2/2" in t for t in texts), listener.frames
