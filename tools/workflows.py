"""Example workflows: the API format is the source, the UI format is generated from it.

`workflows/api/<name>.json` (what `POST /prompt` takes) is written by hand. The UI format
`workflows/<name>.json` (what the ComfyUI front end opens, version 0.4) is generated from it with the
node schemas of a real server's `/object_info`: which inputs are widgets and in which order their
values go into `widgets_values` (plus the extra "control_after_generate" value after seed-like
inputs and the "upload" value after image-upload combos), which are sockets, and which outputs a
node has. Only this direction is written here: the front end's own UI -> API conversion (the Queue
button) is checked against the API files in tests/test_frontend.py.

`tinyfy` rewrites a shipped graph (real model names and sizes) to the tiny test models, so tests and
the offline demo run exactly the shipped structure.

This module talks to ComfyUI over HTTP only (no ComfyUI imports). Regenerate the UI files with

    .venv/bin/python -m easyanimate_reward.tools.workflows write [--url http://127.0.0.1:8188]

(without --url it starts a server of its own through tools/host.py), and check them with `check`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..fileio import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "workflows"
API_DIR = WORKFLOW_DIR / "api"

# Widget types of the front end: an input of one of these types is drawn as a widget (its value
# sits in widgets_values) unless the schema says forceInput. Everything else is a socket.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The front end adds a seed control to these INT inputs even without the schema flag.
SEED_NAMES = {"seed", "noise_seed"}

# What each workflow needs with real weights (shown as a Note node at the top of the UI file and
# as the table in workflows/README.md). VRAM figures are estimates for one GPU.
V5_12B = "EasyAnimateV5-12b-zh-InP"
V51_12B = "EasyAnimateV5.1-12b-zh-InP"
V51_CONTROL = "EasyAnimateV5.1-12b-zh-Control"
V51_CAMERA = "EasyAnimateV5.1-12b-zh-Control-Camera"
HPS_LORA = "EasyAnimateV5-12b-zh-InP-HPS2.1.safetensors"
MPS_LORA = "EasyAnimateV5-12b-zh-InP-MPS.safetensors"
_V5_NEEDS = (f"models/EasyAnimate/{V5_12B}/ (the full Hugging Face folder, ~40 GB on disk; "
             "transformer 23.6 GB in bf16)")
_V51_NEEDS = (f"models/EasyAnimate/{V51_12B}/ (the full Hugging Face folder; transformer 23.6 GB in bf16, "
              "Qwen2-VL-7B text encoder)")
_LORA_NEEDS = (f"models/loras/{HPS_LORA} (1.8 GB, from alibaba-pai/EasyAnimateV5-Reward-LoRAs)")
_VRAM_12B = ("VRAM (estimated): about 24 GB with gpu_memory_mode model_cpu_offload, about 16 GB with "
             "model_cpu_offload_and_qfloat8, under 12 GB with sequential_cpu_offload (slow); "
             "plus about 40 GB of system RAM")

NOTES: dict[str, dict[str, Any]] = {
    "01_text_to_video": {
        "title": "Text to video with a reward LoRA",
        "what": "Samples one 49-frame video at 384x672 from a prompt with the HPS v2.1 reward LoRA at strength 0.7 "
                "and saves it as an MP4 (output/video/easyanimate_t2v_*.mp4).",
        "needs": [_V5_NEEDS, _LORA_NEEDS],
        "vram": _VRAM_12B,
    },
    "07_lora_comparison": {
        "title": "Base vs HPS v2.1 LoRA vs MPS LoRA",
        "what": "One prompt and seed sampled three times: base model, HPS v2.1 reward LoRA, MPS reward LoRA "
                "(both at 0.7); the three videos are saved side by side in one MP4. The LoRAs patch the "
                "shared transformer in place, so the model is loaded once.",
        "needs": [_V5_NEEDS, _LORA_NEEDS, f"models/loras/{MPS_LORA} (1.8 GB)"],
        "vram": _VRAM_12B + "; three samplings take three times as long",
    },
    "02_image_to_video": {
        "title": "Image to video",
        "what": "Animates a start image (LoadImage; put start_frame.png in ComfyUI's input folder or pick your own) "
                "with the InP model and saves an MP4.",
        "needs": [_V51_NEEDS, "input/start_frame.png (any picture; it is resized to the video size)"],
        "vram": _VRAM_12B,
    },
    "09_score_frames": {
        "title": "Score frames with two rewards and their combination",
        "what": "Samples a video, scores every frame with HPS v2.1, with the weight-free colourfulness reward and "
                "with a weighted combination of both; shows the per-frame score plots.",
        "needs": [_V51_NEEDS, "models/reward_models/HPS_v2.1_compressed.pt (3.9 GB, from xswu/HPSv2)"],
        "vram": _VRAM_12B + "; the HPS reward (CLIP-H) adds about 2.5 GB",
    },
    "10_best_of_n": {
        "title": "Best of N seeds, ranked by reward",
        "what": "Samples 4 videos (seeds seed..seed+3, the sampler's `videos` input), ranks them by mean HPS v2.1 "
                "frame score and saves the best one.",
        "needs": [_V51_NEEDS, "models/reward_models/HPS_v2.1_compressed.pt (3.9 GB)"],
        "vram": _VRAM_12B + "; time grows with N (4 samplings)",
    },
    "11_train_reward_lora": {
        "title": "Train a reward LoRA, then use it",
        "what": "Reward backpropagation: trains a LoRA that maximises the HPS v2.1 reward of sampled videos, saves it "
                "to models/loras, then samples with it. The Rollout and LoRA-and-Optimiser settings nodes hold the "
                "official recipe; add 'Trainer: Evaluation' (held-out prompts, validation MP4s, motion guards) and "
                "'Trainer: Checkpoints and Logging' (numbered checkpoints, TensorBoard) from EasyAnimate/training "
                "when you need them (unconnected, their defaults apply). Run folder: "
                "output/easyanimate_reward_runs/<lora_name>/.",
        "needs": [_V5_NEEDS, "models/reward_models/HPS_v2.1_compressed.pt (3.9 GB)"],
        "vram": "VRAM (estimated): 40 GB or more for the 12b model at 256x256x49 frames with gradient checkpointing (an "
                "A100/H100-class GPU); the 7b model needs less",
    },
    "04_video_to_video": {
        "title": "Refine an existing video with a reward LoRA",
        "what": "Video-to-video: the frames of input/input_video.mp4 (LoadVideo; at least 49 frames) are encoded, "
                "noised to denoise_strength 0.7 and denoised with the HPS v2.1 reward LoRA at strength 0.7; the size "
                "is the trained bucket closest to the video's aspect ratio at base_resolution 512. Lower the "
                "strength to keep more of the input.",
        "needs": [_V5_NEEDS, _LORA_NEEDS, "input/input_video.mp4 (any clip of 49+ frames)"],
        "vram": _VRAM_12B + "; the VAE also encodes the input video (about 2 GB more at 512)",
    },
    "05_video_to_video_control": {
        "title": "Control video (pose / depth / canny) with a V5.1 Control model",
        "what": "Generates a video that follows the control frames of input/control_pose.mp4 (make them with any "
                "preprocessor pack, e.g. DWPose, depth or canny nodes). The size is the bucket closest to the control "
                "video's aspect ratio at base_resolution 512.",
        "needs": [f"models/EasyAnimate/{V51_CONTROL}/ (the full Hugging Face folder; transformer 23.6 GB in bf16, "
                  "Qwen2-VL-7B text encoder)", "input/control_pose.mp4 (49+ control frames)"],
        "vram": _VRAM_12B,
    },
    "06_control_camera": {
        "title": "Camera motion with a V5.1 Control-Camera model",
        "what": "Animates a reference image with a camera that pans up and left at once (EasyAnimate Camera Motion: "
                "presets add up; chain nodes through `previous` for one move after another), 49 frames at "
                "base_resolution 512.",
        "needs": [f"models/EasyAnimate/{V51_CAMERA}/ (the full Hugging Face folder; transformer 23.6 GB in bf16, "
                  "Qwen2-VL-7B text encoder)", "input/start_frame.png (the reference image)"],
        "vram": _VRAM_12B,
    },
    "03_image_to_video_end_image": {
        "title": "Image to video between a start and an end frame",
        "what": "The InP model keeps the first frame (start_frame.png) and the last (end_frame.png) and generates "
                "the frames between; leave start_image unconnected to give the end frame alone.",
        "needs": [_V51_NEEDS, "input/start_frame.png and input/end_frame.png (any pictures of the same scene)"],
        "vram": _VRAM_12B,
    },
    "08_strength_sweep": {
        "title": "Reward vs LoRA strength",
        "what": "Same prompt and seed sampled at LoRA strengths 0, 0.25, 0.5, 0.75, 1; every video is scored "
                "with HPS v2.1 and the mean reward is plotted against the strength.",
        "needs": [_V5_NEEDS, _LORA_NEEDS, "models/reward_models/HPS_v2.1_compressed.pt (3.9 GB)"],
        "vram": _VRAM_12B + "; five samplings",
    },
}


def note_text(name: str) -> str:
    note = NOTES[name]
    lines = [note["title"], "", note["what"], "", "Needs (real weights):"]
    lines += [f"- {item}" for item in note["needs"]]
    lines += ["", note["vram"] + ".", "",
              "Model folders go under ComfyUI/models/ (EasyAnimate/, loras/, reward_models/). "
              "A missing file stops the run with an error naming it."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ node schemas


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str          # "INT", "COMBO", "IMAGE", ...
    optional: bool
    widget: bool       # drawn as a widget (value in widgets_values) rather than a socket
    extra_widgets: int  # values the front end stores right after this one (seed control, upload button)
    default: Any = None  # the widget's value when a link feeds it instead


@dataclass(frozen=True)
class NodeSchema:
    type: str
    display_name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, type)

    @property
    def sockets(self) -> list[InputSpec]:
        return [i for i in self.inputs if not i.widget]

    @property
    def widgets(self) -> list[InputSpec]:
        return [i for i in self.inputs if i.widget]


def _input_spec(name: str, spec: list, optional: bool) -> InputSpec:
    raw_type = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    kind = "COMBO" if isinstance(raw_type, list) else str(raw_type)
    widget = kind in WIDGET_TYPES and not options.get("forceInput", False)
    extra = 0
    if widget:
        if kind == "INT" and options.get("control_after_generate", name in SEED_NAMES):
            extra += 1
        elif kind == "COMBO" and options.get("control_after_generate"):
            extra += 1
        if kind == "COMBO" and (options.get("image_upload") or options.get("video_upload")
                                or options.get("audio_upload") or options.get("animated_image_upload")):
            extra += 1
    default = options.get("default")
    if default is None and widget:
        choices = raw_type if isinstance(raw_type, list) else options.get("options") or []
        default = choices[0] if kind == "COMBO" and choices else {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(kind, "")
    return InputSpec(name, kind, optional, widget, extra, default)


def node_schema(object_info: Mapping[str, Any], node_type: str) -> NodeSchema:
    if node_type not in object_info:
        raise KeyError(f"node type {node_type!r} is not registered on the server (missing node pack or module?)")
    info = object_info[node_type]
    inputs = []
    order = info.get("input_order") or {key: list(info["input"].get(key, {})) for key in ("required", "optional")}
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in order.get(section, []):
            inputs.append(_input_spec(name, specs[name], section == "optional"))
    names = info.get("output_name") or info["output"]
    outputs = tuple((str(n), str(t) if not isinstance(t, list) else "COMBO") for n, t in zip(names, info["output"]))
    return NodeSchema(node_type, info.get("display_name") or node_type, tuple(inputs), outputs)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# ------------------------------------------------------------------------------ API -> UI

NODE_WIDTH = 360
COLUMN_GAP = 60
ROW_GAP = 40
NOTE_SIZE = (560, 300)


def _estimate_height(schema: NodeSchema) -> int:
    # Title bar + slot rows + widget rows; multiline STRING widgets get a text box. The front end
    # grows a node to its computed size on load, so this only needs to keep columns from overlapping.
    slots = max(len(schema.sockets), len(schema.outputs))
    height = 36 + 22 * slots
    for spec in schema.widgets:
        height += 26 * (1 + spec.extra_widgets)
        if spec.type == "STRING":
            height += 70
    return height


def _columns(api: Mapping[str, Any]) -> dict[str, int]:
    """Longest distance from a source node: left-to-right layout in data-flow order."""
    depth: dict[str, int] = {}

    def visit(node_id: str, stack: tuple[str, ...] = ()) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in stack:
            raise ValueError(f"cycle through node {node_id}")
        parents = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v)]
        depth[node_id] = 1 + max((visit(p, stack + (node_id,)) for p in parents), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def _execution_order(api: Mapping[str, Any], columns: Mapping[str, int]) -> dict[str, int]:
    ranked = sorted(api, key=lambda n: (columns[n], int(n)))
    return {node_id: i for i, node_id in enumerate(ranked)}


def _check_node_ids(api: Mapping[str, Any]) -> None:
    for node_id in api:
        if not node_id.isdigit():
            raise ValueError(f"node id {node_id!r}: use integer ids so the UI and API files share them")


def _input_slots(api: Mapping[str, Any], schemas: Mapping[str, NodeSchema]) -> dict[str, dict[str, int]]:
    """{node id: {input name: slot}}: the sockets in schema order, then the widgets a link feeds
    (the front end shows those as sockets too, with a "widget" entry naming the widget)."""
    slots = {}
    for nid, node in api.items():
        sockets = [s.name for s in schemas[nid].sockets]
        fed_widgets = [s.name for s in schemas[nid].widgets if _is_link(node["inputs"].get(s.name))]
        slots[nid] = {name: i for i, name in enumerate(sockets + fed_widgets)}
    return slots


def _ui_links(api: Mapping[str, Any], schemas: Mapping[str, NodeSchema], input_slots: Mapping[str, dict[str, int]]
              ) -> tuple[list[list], dict[tuple[str, int], list[int]]]:
    """The UI's links [id, source, slot, target, target slot, type], in (target node, target slot)
    order so ids are stable, and {(source, slot): [link ids]}."""
    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    for node_id in sorted(api, key=int):
        for spec in schemas[node_id].inputs:
            value = api[node_id]["inputs"].get(spec.name)
            if value is None or not _is_link(value):
                continue
            source, slot = value
            if source not in api:
                raise ValueError(f"node {node_id} input {spec.name!r} links to missing node {source}")
            link_id = len(links) + 1
            links.append([link_id, int(source), slot, int(node_id), input_slots[node_id][spec.name],
                          schemas[source].outputs[slot][1]])
            out_links.setdefault((source, slot), []).append(link_id)
    return links, out_links


def _ui_inputs(node_id: str, node: Mapping[str, Any], schema: NodeSchema, input_slots: Mapping[str, int],
               link_into: Mapping[tuple[int, int], int]) -> list[dict]:
    """A UI node's input slots: its sockets, then the widgets fed by a link."""
    unknown = set(node["inputs"]) - {s.name for s in schema.inputs}
    if unknown:
        raise ValueError(f"node {node_id} ({schema.type}) has inputs the server does not know: {sorted(unknown)}")
    inputs = []
    for slot, spec in enumerate(schema.sockets):
        if not spec.optional and (int(node_id), slot) not in link_into:
            missing = [s.name for i, s in enumerate(schema.sockets) if not s.optional and (int(node_id), i) not in link_into]
            raise ValueError(f"node {node_id} ({schema.type}) has unconnected required inputs: {missing}")
        entry = {"name": spec.name, "type": spec.type, "link": link_into.get((int(node_id), slot))}
        if spec.optional:
            entry["shape"] = 7  # the front end's mark for an optional socket (hollow dot)
        inputs.append(entry)
    for spec in schema.widgets:
        if _is_link(node["inputs"].get(spec.name)):
            inputs.append({"name": spec.name, "type": spec.type, "widget": {"name": spec.name},
                           "link": link_into[(int(node_id), input_slots[spec.name])]})
    return inputs


def _widgets_values(node_id: str, node: Mapping[str, Any], schema: NodeSchema) -> list:
    """The widget values in schema order, with the extra values the front end stores after some."""
    values = []
    for spec in schema.widgets:
        if spec.name not in node["inputs"]:
            raise ValueError(f"node {node_id} ({schema.type}) has no value for widget {spec.name!r}")
        value = node["inputs"][spec.name]
        values.append(spec.default if _is_link(value) else value)
        if spec.extra_widgets:
            # seed control: keep the shipped seed; image upload button: stores "image"
            values += ["fixed" if spec.type == "INT" else "image"][: spec.extra_widgets]
    return values


def _ui_outputs(node_id: str, schema: NodeSchema, out_links: Mapping[tuple[str, int], list[int]]) -> list[dict]:
    return [{"name": name, "type": kind, "links": out_links.get((node_id, slot)) or None, "slot_index": slot}
            for slot, (name, kind) in enumerate(schema.outputs)]


def _note_node(node_id: int, note: str) -> dict:
    return {
        "id": node_id, "type": "Note", "pos": [0, 0], "size": list(NOTE_SIZE), "flags": {}, "order": 0,
        "mode": 0, "inputs": [], "outputs": [], "title": "Read me: what this workflow needs",
        "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653",
    }


def api_to_ui(api: Mapping[str, Any], object_info: Mapping[str, Any], note: str | None = None) -> dict:
    """A version-0.4 UI workflow for an API-format graph (node ids must be integers as strings):
    nodes laid out left to right in data-flow order, a column per distance from the sources."""
    _check_node_ids(api)
    schemas = {node_id: node_schema(object_info, node["class_type"]) for node_id, node in api.items()}
    columns = _columns(api)
    order = _execution_order(api, columns)
    input_slots = _input_slots(api, schemas)
    links, out_links = _ui_links(api, schemas, input_slots)
    link_into = {(link[3], link[4]): link[0] for link in links}
    top = NOTE_SIZE[1] + ROW_GAP if note else 0
    column_y: dict[int, int] = {}
    nodes: list[dict] = []
    for node_id in sorted(api, key=lambda n: (columns[n], int(n))):
        node, schema = api[node_id], schemas[node_id]
        inputs = _ui_inputs(node_id, node, schema, input_slots[node_id], link_into)
        column = columns[node_id]
        y = column_y.get(column, top)
        height = _estimate_height(schema)
        column_y[column] = y + height + ROW_GAP
        entry = {"id": int(node_id), "type": schema.type, "pos": [column * (NODE_WIDTH + COLUMN_GAP), y],
                 "size": [NODE_WIDTH, height], "flags": {}, "order": order[node_id] + (1 if note else 0), "mode": 0,
                 "inputs": inputs, "outputs": _ui_outputs(node_id, schema, out_links)}
        title = (node.get("_meta") or {}).get("title")
        if title and title != schema.display_name:
            entry["title"] = title
        entry["properties"] = {"Node name for S&R": schema.type}
        entry["widgets_values"] = _widgets_values(node_id, node, schema)
        nodes.append(entry)
    last_id = max(int(n) for n in api)
    if note:
        last_id += 1
        nodes.insert(0, _note_node(last_id, note))
    return {"last_node_id": last_id, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


# ------------------------------------------------------------------------------ tiny test graphs

TINY_SAMPLER = {"width": 32, "height": 32, "frames": 5, "steps": 3}
TINY_LOADER = {"precision": "fp32", "gpu_memory_mode": "none"}
# Reward training: two optimiser steps of a rank-4 LoRA on 3-step rollouts, gradient on the last step.
TINY_TRAINER = {"train_steps": 2, "sampling_steps": 3, "rank": 4, "alpha": 4.0, "backprop_k": 1, "save_every": 0}


def tinyfy(
    graph: Mapping[str, Any],
    model_names: Mapping[str, str],
    file_names: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict:
    """A copy of a shipped API graph that runs on tiny models in seconds on a CPU.

    - `model_names`: {"v5": tiny folder name, "v5.1": ..., "v5.1-camera": ...}. Every
      EasyAnimateModelLoader gets the tiny model of its real model's version and kind (a name
      containing "V5.1" is V5.1, else V5; "-Control-Camera", "-Control", "-InP" or none, see
      `_tiny_key`), fp32 and gpu_memory_mode "none". The sampler's base_resolution becomes
      "width x height" (the tiny size).
    - Every input called width/height/frames/steps on the pack's sampling and training nodes becomes
      32/32/5/3 (TINY_SAMPLER); frames_per_video of a ranking node follows the frame count; the
      reward trainer gets TINY_TRAINER (2 steps, rank 4, 3-step rollouts).
    - `file_names`: {real file name: tiny file name} for any string input (LoRA files, images).
    - `overrides`: {class_type: {input: value}} applied last (e.g. fewer training steps).
    Links and node ids are untouched: the structure is exactly the shipped one.
    """
    out = copy.deepcopy(dict(graph))
    files = dict(file_names or {})
    for node in out.values():
        inputs = node["inputs"]
        kind = node["class_type"]
        if kind == "EasyAnimateReward_ModelLoader":
            inputs["model"] = model_names[_tiny_key(str(inputs["model"]))]
            inputs.update(TINY_LOADER)
        if "base_resolution" in inputs and not _is_link(inputs["base_resolution"]):
            inputs["base_resolution"] = "width x height"
        if kind.startswith("EasyAnimate") or kind.startswith("Reward"):
            for key, value in TINY_SAMPLER.items():
                if key in inputs and not _is_link(inputs[key]):
                    inputs[key] = value
            if "frames_per_video" in inputs and not _is_link(inputs["frames_per_video"]):
                inputs["frames_per_video"] = TINY_SAMPLER["frames"]
        if kind == "EasyAnimateReward_RewardLoRATrainer" or kind.startswith("EasyAnimateReward_Train"):
            inputs.update({k: v for k, v in TINY_TRAINER.items() if k in inputs})  # trainer + settings nodes
        for key, value in list(inputs.items()):
            if isinstance(value, str) and value in files:
                inputs[key] = files[value]
        for key, value in (overrides or {}).get(kind, {}).items():
            inputs[key] = value
    return out


def _tiny_key(real_name: str) -> str:
    """The tiny-model key for a published model name (test mapping only; the pack itself reads the
    kind from the folder's config): "v5", "v5.1", "v5-t2v", "v5.1-control", "v5.1-camera", ..."""
    version = "v5.1" if "V5.1" in real_name else "v5"
    if real_name.endswith("-Control-Camera"):
        return f"{version}-camera"
    if real_name.endswith("-Control"):
        return f"{version}-control"
    return version if real_name.endswith("-InP") else f"{version}-t2v"


TINY_LORAS = {HPS_LORA: "tiny-v5-hps.safetensors", MPS_LORA: "tiny-v5-mps.safetensors"}
TINY_START_IMAGE = "start_frame.png"
TINY_END_IMAGE = "end_frame.png"
TINY_VIDEOS = ("input_video.mp4", "control_pose.mp4")  # 9 frames, 48x64


def write_tiny_lora(version: str, dest: str | os.PathLike, seed: int = 0, rank: int = 2) -> Path:
    """A random LoRA on every Linear of the tiny `version` transformer, in the official (kohya)
    format: a stand-in for the real reward LoRAs in tests and the offline demo."""
    import torch

    from ..easyanimate.lora_format import lora_target_modules, save_lora_file, weights_from_tensors
    from ..easyanimate.tiny import build_tiny_transformer

    transformer = build_tiny_transformer(version)  # same shapes as the tiny model folder's
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, module in lora_target_modules(transformer).items():
        down = torch.randn(rank, module.in_features, generator=generator) * 0.5
        up = torch.randn(module.out_features, rank, generator=generator) * 0.5
        tensors[path] = (down, up)
    return save_lora_file(dest, weights_from_tensors(tensors, alpha=float(rank)), dtype=torch.float32,
                          transformer_blocks=transformer.config.num_layers)


def install_tiny_assets(base: str | os.PathLike, graph: Mapping[str, Any] | None = None) -> None:
    """What the tinyfied example graphs load, written into a ComfyUI base folder: tiny LoRAs
    (TINY_LORAS, for the V5 tiny model), a start image for LoadImage, and, when `graph` is None or
    loads a reward model, the tiny reward_models folder. Existing files are kept."""
    import numpy as np
    from PIL import Image

    base = Path(base)
    loras = base / "models" / "loras"
    for seed, name in enumerate(TINY_LORAS.values()):
        if not (loras / name).is_file():
            write_tiny_lora("v5", loras / name, seed)
    image = base / "input" / TINY_START_IMAGE
    if not image.is_file():
        image.parent.mkdir(parents=True, exist_ok=True)
        gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
        Image.fromarray(gradient).save(image)
    end = base / "input" / TINY_END_IMAGE
    if not end.is_file():
        Image.fromarray(np.linspace(255, 0, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)).save(end)
    for seed, name in enumerate(TINY_VIDEOS):
        if not (base / "input" / name).is_file():
            _write_tiny_video(base / "input" / name, seed)
    uses_rewards = graph is None or any(n["class_type"] == "EasyAnimateReward_RewardModelLoader" for n in graph.values())
    rewards = base / "models" / "reward_models"
    if uses_rewards and not (rewards / "HPS_v2.1_compressed.pt").is_file():
        from ..reward.registry import write_tiny_reward_models

        write_tiny_reward_models(rewards)


def _write_tiny_video(path: Path, seed: int, frames: int = 9, size: tuple[int, int] = (48, 64)) -> None:
    """A small moving-gradient MP4 for LoadVideo (written beside, then renamed)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    partial = path.with_name(path.stem + ".partial" + path.suffix)
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("h264", rate=8)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        base = rng.integers(0, 255, (1, 1, 3))
        for i in range(frames):
            ramp = np.linspace(0, 255, size[1])[None, :, None] * np.ones((size[0], 1, 1))
            frame = ((ramp + 16 * i + base) % 256).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(partial, path)


# ------------------------------------------------------------------------------ files


def workflow_names() -> list[str]:
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def build_ui(name: str, object_info: Mapping[str, Any]) -> dict:
    from .layout import arrange  # positions, the opening view and linked widgets' values (tools/layout.py)

    return arrange(api_to_ui(load_api(name), object_info, note_text(name) if name in NOTES else None), object_info)


def readme_text() -> str:
    lines = [
        "# Example workflows",
        "",
        "`workflows/*.json` open in the ComfyUI front end (drag a file onto the canvas, or use the template",
        "browser: ComfyUI lists a pack's `workflows/` folder). `workflows/api/*.json` are the same graphs in",
        "the API format for `POST /prompt` (`{\"prompt\": <file contents>}`).",
        "",
        "The API files are the source; the UI files are generated from them with the node schemas of a",
        "running server: `.venv/bin/python -m easyanimate_reward.tools.workflows write`. Tests",
        "(`tests/test_workflows.py`) check that both agree, run every API graph on the real host with tiny",
        "models (`tools.workflows.tinyfy`), and `tests/test_frontend.py` opens every UI file in the real",
        "front end.",
        "",
        "| workflow | what it does | needs (real weights) | VRAM |",
        "|---|---|---|---|",
    ]
    for name in workflow_names():
        if name not in NOTES:
            continue
        note = NOTES[name]
        needs = "<br>".join(item.replace("|", "\\|") for item in note["needs"])
        lines.append(f"| `{name}` | {note['what']} | {needs} | {note['vram']} |")
    return "\n".join(lines) + "\n"


def write_all(object_info: Mapping[str, Any]) -> list[Path]:
    written = []
    for name in workflow_names():
        path = WORKFLOW_DIR / f"{name}.json"
        write_text_atomic(path, dumps(build_ui(name, object_info)))
        written.append(path)
    write_text_atomic(WORKFLOW_DIR / "README.md", readme_text())
    written.append(WORKFLOW_DIR / "README.md")
    return written


def check_all(object_info: Mapping[str, Any]) -> list[str]:
    """Problems found (empty = all good): stale UI files (not what `api_to_ui` makes of the API file),
    missing notes, a stale README."""
    problems = []
    for name in workflow_names():
        if name not in NOTES:
            problems.append(f"{name}: no entry in NOTES (what it needs with real weights)")
            continue
        path = WORKFLOW_DIR / f"{name}.json"
        if not path.is_file():
            problems.append(f"{name}: {path} missing; run `write`")
            continue
        ui = load_ui(name)
        if ui != build_ui(name, object_info):
            problems.append(f"{name}: {path.name} is not what the converter makes from api/{name}.json; run `write`")
    readme = WORKFLOW_DIR / "README.md"
    if not readme.is_file() or readme.read_text() != readme_text():
        problems.append("workflows/README.md is stale; run `write`")
    return problems


def _object_info_from(url: str | None):
    from urllib import request

    if url:
        with request.urlopen(url.rstrip("/") + "/object_info", timeout=120) as r:
            return json.loads(r.read()), None
    from .host import ComfyServer  # starts the real host with the pack linked in

    server = ComfyServer(Path(tempfile.mkdtemp(prefix="workflows-base-")))
    server.start()
    return server.object_info(), server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("write", "check"))
    parser.add_argument("--url", help="a running ComfyUI server with this pack (default: start one)")
    args = parser.parse_args(argv)
    object_info, server = _object_info_from(args.url)
    try:
        if args.command == "write":
            for path in write_all(object_info):
                print(f"wrote {path}")
            return 0
        problems = check_all(object_info)
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    finally:
        if server is not None:
            server.stop()
            import shutil

            shutil.rmtree(server.base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
