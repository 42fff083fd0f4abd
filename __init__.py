"""EasyAnimate video generation and reward backpropagation for ComfyUI.

ComfyUI imports this file and calls `comfy_entrypoint`. Importing the package does not import
ComfyUI, so `easyanimate/`, `reward/` and `training/` stay usable from plain Python.
"""


async def comfy_entrypoint():
    from .nodes import EasyAnimateRewardExtension

    return EasyAnimateRewardExtension()
