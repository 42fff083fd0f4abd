"""Where a reward-training run keeps its files, and the rule that a run only ever replaces its own.

One run = two LoRA files a user picks, in the LoRA folder (ComfyUI: models/loras):

    <run>.safetensors          the last good LoRA (official EasyAnimate / kohya format)
    <run>.best.safetensors     the LoRA of the best held-out evaluation (with held-out prompts)

and one run folder for everything else, OUTSIDE the LoRA folder (ComfyUI lists models/loras
recursively, so training state there would show up in every LoRA picker):

    <runs root>/<run>/run.json                      settings, step, history, stop reason, best, files
    <runs root>/<run>/training_state.safetensors    AdamW state + float32 masters + GradScaler state
    <runs root>/<run>/plot.png                      reward / loss per step (what the node shows)
    <runs root>/<run>/checkpoints/<run>-step000100.safetensors   numbered LoRAs (checkpoints_total_limit)
    <runs root>/<run>/logs/                         TensorBoard event files
    <runs root>/<run>/validation/step000100_00.mp4  validation videos (+ scores.json)

The runs root is `easyanimate_reward_runs/` in ComfyUI's output folder for the node. The CLI uses
`--run-dir`, or by default the same place when its output lies in a ComfyUI `models/loras` tree
(`<ComfyUI>/output/easyanimate_reward_runs/<run>/`), else `easyanimate_reward_runs/<run>/` beside
the output.

Ownership: every file of a run carries the run's id (LoRA metadata, run.json, the state file's
metadata). A new run claims a name none of whose files exist (LoRA, .best, run folder): the
requested one, else `<name>_001`, `<name>_002`, ...; it creates its run folder at once (the claim)
and checks that every file it will write, temporary names included, can be created, before any
work. Only a resume of that very run (`resume_from` names the run's own LoRA, and all its existing
files carry its id) continues under the same name and writes over its own files.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..fileio import confined_path, probe_writable

RUNS_FOLDER = "easyanimate_reward_runs"
RUN_FILE = "run.json"
STATE_FILE = "training_state.safetensors"
SUBFOLDERS = ("checkpoints", "logs", "validation")
LORA_SUFFIX = ".safetensors"
BEST_SUFFIX = ".best.safetensors"
RUN_ID_KEY = "easyanimate_reward_run_id"  # in the metadata of every file of a run
RUN_FORMAT = "easyanimate_reward.run/1"
MAX_COUNTER = 9999


def lora_file_name(name: str) -> str:
    """A user-typed LoRA name -> the relative file name ('.safetensors' added). Confinement to
    the LoRA folder is `fileio.confined_path`'s job (the one rule of the pack)."""
    text = str(name or "").strip().replace("\\", "/")
    return text if text.endswith(LORA_SUFFIX) else text + LORA_SUFFIX


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(LORA_SUFFIX)] if name.endswith(LORA_SUFFIX) else name


@dataclass(frozen=True)
class RunLayout:
    lora: Path  # <run>.safetensors
    folder: Path  # the run folder

    @property
    def best(self) -> Path:
        return self.lora.with_name(_stem(self.lora) + BEST_SUFFIX)

    @property
    def run_json(self) -> Path:
        return self.folder / RUN_FILE

    @property
    def state(self) -> Path:
        return self.folder / STATE_FILE

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def validation(self) -> Path:
        return self.folder / "validation"

    @property
    def plot(self) -> Path:
        return self.folder / "plot.png"

    @property
    def name(self) -> str:
        return _stem(self.lora)

    def checkpoint(self, step: int) -> Path:
        """The numbered LoRA of `step` (a name that sorts by step)."""
        return self.checkpoints / f"{self.name.rsplit('/', 1)[-1]}-step{step:06d}{LORA_SUFFIX}"

    def validation_video(self, step: int, index: int) -> Path:
        return self.validation / f"step{step:06d}_{index:02d}.mp4"

    @property
    def validation_scores(self) -> Path:
        return self.validation / "scores.json"

    def written_files(self) -> list[Path]:
        """Every file the run writes (each through an atomic writer with a temporary name); the
        numbered and validation files stand for all of their kind (same folder, same name length)."""
        return [self.lora, self.best, self.run_json, self.state, self.plot, self.checkpoint(999_999),
                self.validation_video(999_999, 99), self.validation_scores]

    def existing(self) -> list[Path]:
        return [p for p in (self.lora, self.best, self.folder) if _exists(p)]

    def numbered(self, counter: int) -> "RunLayout":
        suffix = f"_{counter:03d}"
        return RunLayout(self.lora.with_name(_stem(self.lora) + suffix + LORA_SUFFIX),
                         self.folder.with_name(self.folder.name + suffix))

    # -- where --------------------------------------------------------------------------------

    @classmethod
    def in_folders(cls, lora_root: str | os.PathLike, runs_root: str | os.PathLike, name: str) -> "RunLayout":
        """The run `name` (relative, as typed in a workflow) with its LoRA in `lora_root` and its
        folder in `runs_root`; names that would leave either folder are refused."""
        relative = lora_file_name(name)
        lora = confined_path(lora_root, relative, what="lora_name")
        folder = confined_path(runs_root, relative[: -len(LORA_SUFFIX)], what="lora_name")
        return cls(lora, folder)

    @classmethod
    def for_lora_file(cls, path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> "RunLayout":
        """The CLI's layout for the LoRA file `path` (any path its user gives): `run_dir`, else the
        default runs root (see the module docstring) + the run's name."""
        lora = Path(lora_file_name(str(path))).absolute()
        if run_dir is not None:
            return cls(lora, Path(run_dir).absolute())
        comfy = _comfyui_loras_root(lora)
        if comfy is not None:
            loras_root, base = comfy
            relative = lora.relative_to(loras_root).as_posix()[: -len(LORA_SUFFIX)]
            return cls(lora, base / "output" / RUNS_FOLDER / relative)
        return cls(lora, lora.parent / RUNS_FOLDER / _stem(lora))


def _exists(path: Path) -> bool:
    try:
        return path.exists() or path.is_symlink()
    except OSError as e:  # e.g. a name too long for the filesystem
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def _comfyui_loras_root(lora: Path) -> tuple[Path, Path] | None:
    """(<base>/models/loras, <base>) when `lora` lies in a ComfyUI models/loras tree."""
    for parent in lora.parents:
        if parent.name == "loras" and parent.parent.name == "models":
            return parent, parent.parent.parent
    return None


# -- ownership ---------------------------------------------------------------------------------


def new_run_id() -> str:
    return uuid.uuid4().hex


def file_run_id(path: Path) -> str | None:
    """The run id in a safetensors file's metadata (None: no such file, unreadable, or not a run's)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get(RUN_ID_KEY)
    except Exception:  # a damaged or foreign file belongs to no run
        return None


def read_run_record(layout: RunLayout) -> dict | None:
    """run.json of the run (None when there is none); ValueError for a damaged one."""
    if not layout.run_json.is_file():
        return None
    try:
        record = json.loads(layout.run_json.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{layout.run_json} is not valid JSON: {e}") from e
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise ValueError(f"{layout.run_json} is not a run record written by this trainer")
    return record


def run_id_of(layout: RunLayout) -> str | None:
    """The run's id when its run.json and its LoRA agree on it (and a .best, if any, carries it too);
    None when the files are not one run's (a foreign LoRA, a missing or damaged run folder, a stale
    .best of another run)."""
    try:
        record = read_run_record(layout)
    except ValueError:
        return None
    run_id = None if record is None else record.get("run_id")
    if not run_id or file_run_id(layout.lora) != run_id:
        return None
    if _exists(layout.best) and file_run_id(layout.best) != run_id:
        return None
    return run_id


def claim_run(requested: RunLayout, resume: RunLayout | None = None) -> tuple[RunLayout, str, bool]:
    """(layout, run id, continuing): the files this run will write, checked writable, its folder made.

    Continuing = `resume` is the requested run itself and all its files are that run's: the run
    writes over its own files. Otherwise a new run, under the requested name when none of its files
    exist, else under the first free `<name>_NNN`. OSError before any work when a file cannot be
    created (a name too long, a read-only folder)."""
    if resume is not None and _same(requested.lora, resume.lora) and _same(requested.folder, resume.folder):
        run_id = run_id_of(resume)
        if run_id is not None:
            _probe(requested, made_folder=False)
            return requested, run_id, True
    for counter in range(MAX_COUNTER + 1):
        layout = requested if counter == 0 else requested.numbered(counter)
        if layout.existing():
            continue
        layout.folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            layout.folder.mkdir()  # the claim: a run started at the same time takes another name
        except FileExistsError:
            continue
        _probe(layout, made_folder=True)
        return layout, new_run_id(), False
    raise FileExistsError(f"no free run name: {requested.lora} and {MAX_COUNTER} numbered variants exist")


def _probe(layout: RunLayout, made_folder: bool) -> None:
    try:
        for path in layout.written_files():
            probe_writable(path)
    except OSError:
        if made_folder:
            try:
                layout.folder.rmdir()  # ours and still empty
            except OSError:
                pass
        raise


def _same(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (a.exists() and b.exists() and os.path.samefile(a, b))


__all__ = ["RunLayout", "claim_run", "lora_file_name", "read_run_record", "run_id_of", "file_run_id",
           "RUNS_FOLDER", "RUN_ID_KEY", "RUN_FORMAT", "STATE_FILE", "RUN_FILE"]
