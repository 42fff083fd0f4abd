"""Host tests write trainer settings flat; the graph has them on the trainer node and its settings
nodes. This splits them by the settings table (the same table the nodes are generated from)."""

from easyanimate_reward.training.config import PromptSources, TrainConfig
from easyanimate_reward.training.settings import RUN, SETTINGS_GROUPS, group_rows

TRAINER = "EasyAnimateReward_RewardLoRATrainer"
SETTINGS_NODE_IDS = {"rollout": "EasyAnimateReward_TrainRolloutSettings",
                     "optimizer": "EasyAnimateReward_TrainLoRAOptimiserSettings",
                     "evaluation": "EasyAnimateReward_TrainEvaluationSettings",
                     "logging": "EasyAnimateReward_TrainCheckpointsLoggingSettings"}


def widget_default(row):
    if row.spec.optional_number:
        return "" if row.default is None else f"{row.default:g}"
    return row.default


def trainer_graph(node: str, inputs: dict) -> dict:
    """{node: trainer, node-<group>: settings node of each group that `inputs` names}."""
    inputs = dict(inputs)
    groups = {}
    for group in SETTINGS_GROUPS:
        rows = group_rows(group, TrainConfig, PromptSources)
        if any(row.name in inputs for row in rows):
            values = {row.name: inputs.pop(row.name, widget_default(row)) for row in rows}
            groups[group] = {"class_type": SETTINGS_NODE_IDS[group], "inputs": values}
    graph = {f"{node}-{group}": settings for group, settings in groups.items()}
    trainer_inputs = dict(inputs, **{group: [f"{node}-{group}", 0] for group in groups})
    graph[node] = {"class_type": TRAINER, "inputs": trainer_inputs}
    return graph


assert {row.name for row in group_rows(RUN, TrainConfig)} == {"train_steps", "seed"}
