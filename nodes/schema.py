"""What the pack's node schemas share: the id prefix and the schema call, the sockets several nodes
take (model, reward, frames, prompt, scoring batch size), and the text an output node shows on itself
(ui={"text": ...}, as ComfyUI's own nodes show text)."""

from __future__ import annotations

from comfy_api.latest import io

from .types import EasyAnimateModelType, RewardModelType

PREFIX = "EasyAnimateReward_"  # every node id of the pack (tests/test_node_ids.py)


def node_schema(name: str, display_name: str, category: str, description: str, inputs, outputs, *,
                output_node: bool = False, node_id_input: bool = False) -> io.Schema:
    """io.Schema for node `PREFIX + name`. `output_node`: the node shows a result of its own, so a
    graph may end in it. `node_id_input`: the node reads cls.hidden.unique_id (a progress bar or
    text sent to this node while it runs)."""
    return io.Schema(node_id=PREFIX + name, display_name=display_name, category=category, description=description,
                     inputs=list(inputs), outputs=list(outputs), is_output_node=output_node,
                     hidden=[io.Hidden.unique_id] if node_id_input else [])


def node_id(cls) -> str | None:
    """The running node's id (for its progress bar), when the schema asked for it."""
    return cls.hidden.unique_id if cls.hidden else None


def shown(*outputs, text: str, node: str | None = None) -> io.NodeOutput:
    """The node's outputs, with `text` as the node's UI output (kept in /history, as ComfyUI's own
    nodes return text). With the running node's id (`node_id(cls)`) the text is also drawn on the
    node in the front end (the host's progress-text message, as the trainer shows its summary)."""
    if node is not None:
        try:
            from server import PromptServer

            PromptServer.instance.send_progress_text(text, node)
        except Exception:  # noqa: BLE001 - no server (the node run from Python): /history still has it
            pass
    return io.NodeOutput(*outputs, ui={"text": (text,)})


# ------------------------------------------------------------------------------ shared sockets


def model_input(tooltip: str = "The EasyAnimate model (Load EasyAnimate Model, optionally through Apply LoRA)."):
    return EasyAnimateModelType.Input("model", tooltip=tooltip)


def model_output(tooltip: str):
    return EasyAnimateModelType.Output(display_name="model", tooltip=tooltip)


def reward_input(tooltip: str = "The reward that scores the frames (Load Reward Model or Combine Rewards).",
                 name: str = "reward", optional: bool = False):
    return RewardModelType.Input(name, tooltip=tooltip, optional=optional)


def reward_output(tooltip: str):
    return RewardModelType.Output(display_name="reward", tooltip=tooltip)


def reward_and_frames(frames_tooltip: str) -> list:
    """The inputs of a node that scores an IMAGE batch: the reward, then the frames."""
    return [reward_input(), io.Image.Input("frames", tooltip=frames_tooltip)]


def reward_prompt_input(what: str = "frames"):
    return io.String.Input("prompt", multiline=True, default="",
                           tooltip=f"The prompt the {what} should match (ignored by prompt-free rewards).")


def scoring_batch_input():
    return io.Int.Input("batch_size", default=8, min=1, max=256,
                        tooltip="Frames scored at once: lower it if the reward runs out of memory.")


def text_output(name: str, tooltip: str):
    return io.String.Output(display_name=name, tooltip=tooltip)


def image_output(name: str, tooltip: str):
    return io.Image.Output(display_name=name, tooltip=tooltip)
