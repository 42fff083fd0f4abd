"""The pack's ComfyUI nodes (V3 schema). Each node module exports NODES."""

from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io

from .common import register_model_folders

register_model_folders()

# Node modules in the order they appear in the menu. A module that fails to import is reported
# loudly instead of taking the whole pack down with it.
_NODE_MODULES = ("model_nodes", "lora_nodes", "reward_nodes", "train_nodes", "sweep_nodes")


def _collect_nodes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in _NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # not written yet
            raise
        nodes.extend(module.NODES)
    return nodes


class EasyAnimateRewardExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes = _collect_nodes()
        logging.info("EasyAnimate reward pack: %d nodes", len(nodes))
        return nodes
