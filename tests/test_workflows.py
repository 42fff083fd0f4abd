"""The shipped example workflows: the UI files are what the converter makes of the API files, and every API graph runs on the real host.

Each graph is run exactly as shipped except for `tools.workflows.tinyfy` (tiny models, 32x32, 5
frames, 3 steps; the real LoRA names mapped to tiny LoRA files). Tiny reward models, tiny LoRAs and a
start image are written into the server's base folder first.
"""

from __future__ import annotations

from pathlib import Path

import av
import pytest
from PIL import Image

from easyanimate_reward.easyanimate.tiny import TINY_NAMES, TINY_VARIANT_NAMES
from easyanimate_reward.tools import workflows
from easyanimate_reward.tools import host
from easyanimate_reward.tools.host import history_error

TINY_FRAMES = workflows.TINY_SAMPLER["frames"]
TINY_SIZE = workflows.TINY_SAMPLER["width"]
TINY_LORAS = workflows.TINY_LORAS
# Each test run writes its own trained LoRA (the session's base folder is fresh anyway).
TINY_OVERRIDES = {"EasyAnimateReward_RewardLoRATrainer": {"lora_name": "tiny_trained_reward_lora"}}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def workflow_server(comfy_server):
    """The session server plus what the example graphs load: reward models, LoRAs, a start image."""
    workflows.install_tiny_assets(comfy_server.base)
    return comfy_server


def run_workflow(server, name: str) -> dict:
    graph = workflows.tinyfy(workflows.load_api(name), {**TINY_NAMES, **TINY_VARIANT_NAMES}, TINY_LORAS,
                             TINY_OVERRIDES)
    entry = server.run(graph, timeout=300)
    assert history_error(entry) is None, f"{name}: {history_error(entry)}\n{server.log_tail(3000)}"
    return entry["outputs"]


def saved_file(server, result: dict) -> Path:
    path = server.base / result.get("type", "output") / result["subfolder"] / result["filename"]
    assert path.is_file() and path.stat().st_size > 0, path
    return path


def video_shape(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a saved video, decoded with PyAV."""
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return len(frames), frames[0].shape[0], frames[0].shape[1]


def preview_text(outputs: dict, node_id: str) -> str:
    return "".join(outputs[node_id]["text"])


# ------------------------------------------------------------------------------ formats


def test_ui_files_are_generated_from_the_api_files(object_info):
    assert workflows.workflow_names(), "no workflows in workflows/api"
    problems = workflows.check_all(object_info)
    assert problems == [], "\n".join(problems)


def test_a_changed_widget_value_makes_the_ui_file_stale(object_info):
    ui = workflows.load_ui("01_text_to_video")
    assert ui == workflows.build_ui("01_text_to_video", object_info)
    sampler = next(n for n in ui["nodes"] if n["type"] == "EasyAnimateReward_Sampler")
    # prompt, negative, width, height, frames, steps, cfg, seed, "fixed" (seed control), scheduler, videos
    assert sampler["widgets_values"][7:10] == [43, "fixed", "auto"]
    assert sampler["widgets_values"][2] == workflows.load_api("01_text_to_video")["3"]["inputs"]["width"]
    sampler["widgets_values"][2] = 512
    assert ui != workflows.build_ui("01_text_to_video", object_info)


def test_every_workflow_states_what_it_needs(object_info):
    for name in workflows.workflow_names():
        ui = workflows.load_ui(name)
        note = ui["nodes"][0]
        assert note["type"] == "Note" and note["pos"][1] <= min(n["pos"][1] for n in ui["nodes"]), name
        text = note["widgets_values"][0]
        assert "VRAM" in text and "models/EasyAnimate/" in text, name
        for node in workflows.load_api(name).values():
            for value in node["inputs"].values():
                if isinstance(value, str) and value.endswith(".safetensors"):
                    assert value in text, f"{name}: the note does not name {value}"
    readme = (workflows.WORKFLOW_DIR / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in workflows.workflow_names())


def test_tinyfy_keeps_the_structure():
    shipped = workflows.load_api("07_lora_comparison")
    tiny = workflows.tinyfy(shipped, TINY_NAMES, TINY_LORAS)
    assert shipped["1"]["inputs"]["model"] == "EasyAnimateV5-12b-zh-InP"  # file untouched
    assert tiny["1"]["inputs"]["model"] == TINY_NAMES["v5"]
    assert tiny["4"]["inputs"]["lora_name"] == TINY_LORAS[workflows.HPS_LORA]
    assert {k: (v["class_type"], sorted(v["inputs"])) for k, v in tiny.items()} == \
           {k: (v["class_type"], sorted(v["inputs"])) for k, v in shipped.items()}
    for node_id in ("3", "5", "7"):
        inputs = tiny[node_id]["inputs"]
        assert (inputs["width"], inputs["height"], inputs["frames"], inputs["steps"]) == (32, 32, 5, 3)
        assert inputs["prompt"] == ["2", 0]  # links stay links


# ------------------------------------------------------------------------------ runs on the host


# Workflows whose result is one tiny video: {name: id of the SaveVideo node}.
SINGLE_VIDEO_WORKFLOWS = {"01_text_to_video": "5", "02_image_to_video": "5", "03_image_to_video_end_image": "6",
                          "04_video_to_video": "7", "05_video_to_video_control": "6", "06_control_camera": "6"}


@pytest.mark.parametrize("name", SINGLE_VIDEO_WORKFLOWS)
def test_single_video_workflow_runs(workflow_server, name):
    outputs = run_workflow(workflow_server, name)
    path = saved_file(workflow_server, outputs[SINGLE_VIDEO_WORKFLOWS[name]]["images"][0])
    assert path.suffix == ".mp4"
    assert video_shape(path) == (TINY_FRAMES, TINY_SIZE, TINY_SIZE)


def test_lora_comparison_runs(workflow_server):
    outputs = run_workflow(workflow_server, "07_lora_comparison")
    path = saved_file(workflow_server, outputs["11"]["images"][0])
    # three 32-wide videos stitched with two 8-pixel gaps
    assert video_shape(path) == (TINY_FRAMES, TINY_SIZE, 3 * TINY_SIZE + 2 * 8)


def test_score_frames_runs(workflow_server):
    outputs = run_workflow(workflow_server, "09_score_frames")
    plot = Image.open(saved_file(workflow_server, outputs["12"]["images"][0]))
    assert plot.size[0] == 640 and plot.size[1] == 3 * 360  # three plots stacked
    for node_id in ("13", "14"):
        lines = preview_text(outputs, node_id).splitlines()
        assert len(lines) == TINY_FRAMES and lines[0].startswith("frame 0: "), lines
        float(lines[0].split(": ")[1])


def test_best_of_n_runs(workflow_server):
    outputs = run_workflow(workflow_server, "10_best_of_n")
    path = saved_file(workflow_server, outputs["7"]["images"][0])
    assert video_shape(path) == (TINY_FRAMES, TINY_SIZE, TINY_SIZE)  # one video of the four kept
    ranking = preview_text(outputs, "8").splitlines()
    assert len(ranking) == 4 and ranking[0].startswith("rank 1: video "), ranking
    scores = [float(line.rsplit(" ", 1)[1]) for line in ranking]
    assert scores == sorted(scores, reverse=True)


def test_strength_sweep_runs(workflow_server):
    outputs = run_workflow(workflow_server, "08_strength_sweep")
    saved_file(workflow_server, outputs["4"]["images"][0])
    text = preview_text(outputs, "5")
    lines = [line for line in text.splitlines() if line.startswith("strength ")]
    assert [line.split(":")[0] for line in lines] == [f"strength {s}" for s in ("0", "0.25", "0.5", "0.75", "1")]
    means = [float(line.split(": ")[1]) for line in lines]
    assert len(set(means)) > 1, f"the LoRA strength changed nothing: {text}"
    path = saved_file(workflow_server, outputs["7"]["images"][0])
    assert video_shape(path) == (5 * TINY_FRAMES, TINY_SIZE, TINY_SIZE)


def test_train_reward_lora_runs(workflow_server):
    outputs = run_workflow(workflow_server, "11_train_reward_lora")
    assert preview_text(outputs, "8") == "tiny_trained_reward_lora.safetensors"
    trained = workflow_server.base / "models" / "loras" / "tiny_trained_reward_lora.safetensors"
    assert trained.is_file() and trained.stat().st_size > 0
    saved_file(workflow_server, outputs["4"]["images"][0])  # reward/loss history plot
    path = saved_file(workflow_server, outputs["7"]["images"][0])
    assert video_shape(path) == (TINY_FRAMES, TINY_SIZE, TINY_SIZE)


def test_tinyfy_picks_the_tiny_model_of_each_kind():
    names = {**TINY_NAMES, **TINY_VARIANT_NAMES}
    loaders = {name: workflows.tinyfy(workflows.load_api(name), names)["1"]["inputs"]["model"]
               for name in ("04_video_to_video", "05_video_to_video_control", "06_control_camera", "03_image_to_video_end_image")}
    assert loaders == {"04_video_to_video": TINY_NAMES["v5"], "05_video_to_video_control": TINY_VARIANT_NAMES["v5.1-control"],
                       "06_control_camera": TINY_VARIANT_NAMES["v5.1-camera"],
                       "03_image_to_video_end_image": TINY_NAMES["v5.1"]}


def test_every_workflow_has_a_run_test():
    # test_<name without its order number>_runs, or one of SINGLE_VIDEO_WORKFLOWS
    tested = {name.removeprefix("test_").removesuffix("_runs") for name in globals() if name.endswith("_runs")}
    tested |= set(SINGLE_VIDEO_WORKFLOWS)
    untested = {name for name in workflows.workflow_names() if name not in tested and name.split("_", 1)[1] not in tested}
    assert untested == set(), untested


def test_host_lists_the_examples_as_templates(comfy_server):
    # ComfyUI's template browser reads a pack's workflows/*.json (UI format; api/ is not scanned).
    templates = comfy_server.get("/workflow_templates")
    assert sorted(templates.get(host.PACK_NAME, [])) == workflows.workflow_names(), templates
