"""Layout of the generated UI workflows, so that each opens readable in the front end.

`arrange(ui, object_info)` takes a UI workflow as tools/workflows.api_to_ui makes it and
- shows a widget that a link feeds with the value that link really brings when that value is known
  in the graph (a primitive node's value), not the input's schema default;
- lays the nodes out left to right in data-flow order, in stacks of the height that gives the
  largest view scale (below), with the read-me note at the top left, preview nodes (images, videos, text) sized for
  their preview and nothing covering anything;
- stores the view (`extra.ds`: scale and offset) that shows the whole graph in a 1920 x 1000 canvas
  at scale <= 1, so the front end opens there instead of fitting the view (which zooms far out on
  wide graphs).

Works on the UI JSON and the server's /object_info only (no ComfyUI imports).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

TITLE = 30  # the front end's title bar, drawn above a node's pos
GAP_X, GAP_Y = 50, 24
MIN_COLUMN_HEIGHT, MAX_COLUMN_HEIGHT = 900, 2000  # stack heights tried (the tallest node's at least)
VIEW = (1920, 1000)  # the canvas the stored view is made for (a 1080p screen's browser window)
# Screen pixels kept free: left (the side bar), top (tabs, banner, the Run button), right, bottom.
MARGIN = (70, 140, 40, 40)
NOTE_SIZE = (420, 430)

# Nodes that show a preview of their result, and the size that leaves room for it.
PREVIEW_SIZES = {"SaveImage": (400, 420), "PreviewImage": (400, 420), "SaveVideo": (400, 420),
                 "LoadImage": (360, 400), "LoadVideo": (360, 380), "PreviewAny": (360, 200)}
# Front-end primitive nodes whose only widget is the value their output carries.
PRIMITIVES = {"PrimitiveString", "PrimitiveStringMultiline", "PrimitiveInt", "PrimitiveFloat", "PrimitiveBoolean"}


def arrange(ui: Mapping[str, Any], object_info: Mapping[str, Any], view: tuple[int, int] = VIEW) -> dict:
    out = copy.deepcopy(dict(ui))
    show_linked_values(out, object_info)
    tallest = max(_box(n)[1] for n in out["nodes"]) if out["nodes"] else 0
    best = None
    for max_height in range(max(tallest, MIN_COLUMN_HEIGHT), MAX_COLUMN_HEIGHT + 1, 50):
        place_nodes(out, max_height)
        ds = view_for(out["nodes"], view)
        if best is None or ds["scale"] > best[0]:
            best = (ds["scale"], max_height)
    place_nodes(out, best[1])  # the most readable of the tried stack heights (the lowest on a tie)
    out["extra"] = dict(out.get("extra") or {}, ds=view_for(out["nodes"], view))
    return out


# ------------------------------------------------------------------------------ linked widget values


def show_linked_values(ui: dict, object_info: Mapping[str, Any]) -> None:
    """widgets_values of a link-fed widget := the value of the primitive node feeding it."""
    from .workflows import node_schema

    nodes = {node["id"]: node for node in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        if node["type"] not in object_info:
            continue  # Note and other front-end-only nodes
        positions, index = {}, 0
        for spec in node_schema(object_info, node["type"]).widgets:
            positions[spec.name] = index
            index += 1 + spec.extra_widgets
        for entry in node.get("inputs") or []:
            name = (entry.get("widget") or {}).get("name")
            if name is None or entry.get("link") is None or name not in positions:
                continue
            source = nodes[links[entry["link"]][1]]
            if source["type"] in PRIMITIVES and source.get("widgets_values"):
                node["widgets_values"][positions[name]] = source["widgets_values"][0]


# ------------------------------------------------------------------------------ positions


def _depths(ui: dict) -> dict[int, int]:
    """Column of each node: longest path from a source; a source sits just left of its first consumer."""
    parents: dict[int, list[int]] = {n["id"]: [] for n in ui["nodes"]}
    children: dict[int, list[int]] = {n["id"]: [] for n in ui["nodes"]}
    for _, source, _, target, _, _ in ui["links"]:
        parents[target].append(source)
        children[source].append(target)
    depth: dict[int, int] = {}

    def visit(node: int, stack: tuple[int, ...] = ()) -> int:
        if node not in depth:
            if node in stack:
                raise ValueError(f"cycle through node {node}")
            depth[node] = 1 + max((visit(p, stack + (node,)) for p in parents[node]), default=-1)
        return depth[node]

    for node in parents:
        visit(node)
    for node in parents:
        if not parents[node] and children[node]:
            depth[node] = max(0, min(depth[c] for c in children[node]) - 1)
    return depth


def _box(node: dict) -> tuple[int, int]:
    """Width and height the node takes on the canvas (title bar included)."""
    width, height = node["size"]
    if node["type"] in PREVIEW_SIZES:
        width, height = (max(a, b) for a, b in zip((width, height), PREVIEW_SIZES[node["type"]]))
        node["size"] = [width, height]
    return width, height + TITLE


def place_nodes(ui: dict, max_height: int) -> None:
    """Nodes in data-flow order (column, then id) fill stacks top to bottom; a node that would make
    its stack taller than `max_height` starts the next stack to the right. A node never sits left
    of a node it reads from."""
    notes = [n for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    graph = [n for n in ui["nodes"] if n not in notes]
    for note in notes:
        note["size"] = list(NOTE_SIZE)
    depth = _depths(ui) if graph else {}
    stacks: list[list[dict]] = [list(notes)]
    height = sum(_box(n)[1] + GAP_Y for n in notes)
    for node in sorted(graph, key=lambda n: (depth[n["id"]], n["id"])):
        box = _box(node)[1]
        if stacks[-1] and height + box > max_height:
            stacks.append([])
            height = 0
        stacks[-1].append(node)
        height += box + GAP_Y
    x = 0
    for stack in stacks:
        y = 0
        for node in stack:
            width, box = _box(node)
            node["pos"] = [x, y + TITLE]
            y += box + GAP_Y
        x += max((_box(n)[0] for n in stack), default=0) + GAP_X


def bounds(nodes: list[dict]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of all nodes, title bars included."""
    boxes = [(n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def view_for(nodes: list[dict], view: tuple[int, int] = VIEW) -> dict:
    """The front end's view (extra.ds) showing every node, at scale 1 or less."""
    left, top, right, bottom = bounds(nodes)
    scale = min(1.0, (view[0] - MARGIN[0] - MARGIN[2]) / (right - left),
                (view[1] - MARGIN[1] - MARGIN[3]) / (bottom - top))
    scale = round(scale, 3)
    return {"scale": scale, "offset": [round(MARGIN[0] / scale - left, 1), round(MARGIN[1] / scale - top, 1)]}
