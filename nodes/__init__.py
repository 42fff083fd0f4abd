"""The pack's ComfyUI nodes (V3 schema). Each node module exports NODES."""

from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io

from ..easyanimate.cancel import install_cancel_check
from .common import check_interrupt, register_model_folders

register_model_folders()
# Core loops call easyanimate.cancel.check_cancel() between units of work: Cancel in the UI raises there.
install_cancel_check(check_interrupt)

# Node modules in the order they appear in the menu.
_NODE_MODULES = ("model_nodes", "mode_nodes", "lora_nodes", "lora_mix_nodes", "reward_nodes", "train_nodes",
                 "sweep_nodes")


def _collect_nodes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in _NODE_MODULES:
        nodes.extend(importlib.import_module(f".{name}", __name__).NODES)
    return nodes


class EasyAnimateRewardExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes = _collect_nodes()
        logging.info("EasyAnimate reward pack: %d nodes", len(nodes))
        return nodes
