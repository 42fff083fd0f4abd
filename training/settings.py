"""The one table of training settings: every field of TrainConfig carries a `Setting` (group,
tooltip, range, choices), and the trainer node, its settings nodes and the CLI are generated from
it. A setting has one name everywhere: the field name is the node input and `--field-name` the
CLI flag; the tooltip is the node's tooltip and the CLI's help.

Groups (one optional settings node each on the graph, so the trainer node itself stays small):
    run         on the trainer node itself (steps, seed)
    rollout     how each training video is sampled and which steps keep gradients
    optimizer   the LoRA, the loss and the optimiser
    evaluation  held-out prompts, validation videos, motion guards
    logging     checkpoints and TensorBoard
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, dataclass, field, fields

RUN, ROLLOUT, OPTIMIZER, EVALUATION, LOGGING = "run", "rollout", "optimizer", "evaluation", "logging"
GROUPS = (RUN, ROLLOUT, OPTIMIZER, EVALUATION, LOGGING)
SETTINGS_GROUPS = GROUPS[1:]  # the groups that have a settings node


@dataclass(frozen=True)
class Setting:
    group: str
    tooltip: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    multiline: bool = False
    # A number that may be unset (None): a text widget on the node ("" = unset), a float flag.
    optional_number: bool = False
    # Prompt sources (lines or a file name on the node, a file path on the CLI): not in TrainConfig.
    prompts: bool = False


def setting(default, group: str, tooltip: str, **options):
    """A dataclass field carrying its Setting (the table's row)."""
    if group not in GROUPS:
        raise ValueError(f"unknown settings group {group!r}")
    return field(default=default, metadata={"setting": Setting(group, tooltip, **options)})


@dataclass(frozen=True)
class SettingRow:
    """One row of the table as the generators read it."""

    name: str
    kind: type  # bool, int, float, str
    default: object
    spec: Setting

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def rows(*tables) -> list[SettingRow]:
    """The rows of one or more dataclasses whose fields carry a Setting, in declaration order."""
    out = []
    for table in tables:
        hints = typing.get_type_hints(table)
        for f in fields(table):
            spec = f.metadata.get("setting")
            if spec is None:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            kind = hints[f.name]
            if spec.optional_number:
                kind = float
            out.append(SettingRow(f.name, kind, default, spec))
    return out


def group_rows(group: str, *tables) -> list[SettingRow]:
    return [row for row in rows(*tables) if row.spec.group == group]


def split_by_table(values: dict, *tables) -> list[dict]:
    """Values by name -> one dict of constructor arguments per table; unknown names are refused
    (a renamed input in an old workflow fails loudly instead of being ignored)."""
    known = [{row.name for row in rows(t)} for t in tables]
    unknown = sorted(set(values) - set().union(*known))
    if unknown:
        raise TypeError(f"unknown training settings {unknown}")
    return [{k: v for k, v in values.items() if k in names} for names in known]


def parse_number_text(text, name: str) -> float | None:
    """An optional number typed as text: "" -> None, else a finite plain number."""
    from .config import parse_optional_number

    if text is None or isinstance(text, (int, float)):
        if isinstance(text, float) and not math.isfinite(text):
            raise ValueError(f"{name} must be a finite number, got {text!r}")
        return text
    return parse_optional_number(text, name)


@dataclass(frozen=True)
class TrainingSettings:
    """The values of one group, as a settings node passes them to the trainer node."""

    group: str
    values: dict

    def __post_init__(self):
        if self.group not in SETTINGS_GROUPS:
            raise ValueError(f"unknown settings group {self.group!r}")


GROUP_TITLES = {
    ROLLOUT: ("Rollout", "How each training video is sampled (size, steps, guidance, sampler) and which denoising "
                         "steps keep gradients."),
    OPTIMIZER: ("LoRA and Optimiser", "The LoRA (rank, alpha, targets), the loss (presets, max_reward) and the "
                                      "optimiser (learning rate and its schedule, AdamW, clipping, batch)."),
    EVALUATION: ("Evaluation", "Held-out prompts and early stopping, validation videos (MP4s in the run folder) and "
                               "the motion guards."),
    LOGGING: ("Checkpoints and Logging", "Periodic and numbered checkpoints, TensorBoard logs."),
}


# -- the CLI ------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser, *tables) -> None:
    """One flag per row: --field-name, typed, with the row's choices and its tooltip as help."""
    groups = {}
    for row in rows(*tables):
        group = groups.get(row.spec.group)
        if group is None:
            group = groups[row.spec.group] = parser.add_argument_group(f"{row.spec.group} settings")
        spec = row.spec
        help_text = spec.tooltip.replace("%", "%%")
        if row.kind is bool:
            group.add_argument(row.flag, action=argparse.BooleanOptionalAction, default=row.default, help=help_text)
        elif spec.choices:
            group.add_argument(row.flag, choices=spec.choices, default=row.default, help=help_text)
        elif spec.optional_number:
            group.add_argument(row.flag, type=float, default=row.default, help=help_text)
        else:
            group.add_argument(row.flag, type=row.kind, default=row.default, help=help_text)


def cli_values(args: argparse.Namespace, *tables) -> list[dict]:
    return [{row.name: getattr(args, row.name) for row in rows(table)} for table in tables]
