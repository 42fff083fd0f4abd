"""Data-parallel reward training across processes, on Hugging Face accelerate.

Launch the CLI with `accelerate launch --multi_gpu --num_processes N -m easyanimate_reward.training ...`
(or `torchrun --nproc_per_node N -m easyanimate_reward.training ...`): every process is a rank
with the whole (frozen) model, its own prompts and seeds, and the same LoRA.

- Batches: `batch_size` is per rank, so one optimizer step sees `batch_size x world_size x
  grad_accumulation` videos. Global video i of a step has prompt `order[i]` and seed `seed + i`
  whatever the number of ranks, so 2 ranks x batch 1 roll out exactly what 1 process x batch 2
  does, and a run may resume with another number of processes (same global batch: same videos).
- Gradients: the trained LoRA runs through forward hooks, not through a module that DDP could
  wrap, so DDP's reducer would never see its parameters. After the backward passes the LoRA
  gradients are averaged explicitly with accelerate's `reduce` (in buckets), together with the
  step's reward and loss, so every rank clips and steps identically and sees the same (global)
  loss: a NaN on one rank stops every rank at the same step.
- Files: only rank 0 (`is_main`) writes; the others never touch the output folder.
- Held-out evaluation: prompt i goes to rank i mod N (seed from i), the per-frame scores are
  gathered on every rank in prompt order, so best-file and early-stop decisions agree.
- Stops: `install_stop_signals` turns SIGTERM (what torchrun sends the surviving ranks when one
  fails, and what job schedulers send) into the same clean stop as Ctrl-C; `critical()` holds a
  signal until the optimizer step is complete, so the LoRA saved on a stop is always a whole step.
  A rank that dies makes the others' next collective fail; rank 0 then saves the last completed
  step (atomically: a stop mid-write leaves the previous file and no partial one).

Engines: data-parallel with replicated weights (accelerate's MULTI_GPU / MULTI_CPU, torchrun)
runs with every LoRA mode (fused or unfused LoRAs under the one being trained). DeepSpeed's
launcher runs with ZeRO stage 0-2, but the trainer does its own reduction: ZeRO's partitioning of
optimizer state and gradients is not applied to the LoRA (it is small next to the frozen model).
FSDP and ZeRO-3 shard the transformer's weights, which breaks fused LoRA patching (it writes the
merged weights in place) and the trained LoRA's hooks on whole Linear weights: they are refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from typing import Iterable, Sequence

import torch

log = logging.getLogger(__name__)

BUCKET_ELEMENTS = 1 << 25  # 32 M float32 (128 MiB) per all-reduce: bounded extra memory for the flat copy


class UnsupportedEngineError(ValueError):
    """The launcher asked for an engine this trainer cannot run (FSDP, ZeRO-3)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _deepspeed_zero_stage() -> int | None:
    """ZeRO stage that `accelerate launch --use_deepspeed` passed on (None: not DeepSpeed)."""
    if not _env_true("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage", stage)
    try:
        return int(stage) if stage not in (None, "", "auto") else 0
    except ValueError:
        return 0


def check_engine() -> str:
    """The engine the launcher set up: 'ddp' or 'deepspeed'; refuses FSDP and ZeRO-3 before
    anything is loaded."""
    if _env_true("ACCELERATE_USE_FSDP"):
        raise UnsupportedEngineError(
            "FSDP is not supported for reward-LoRA training: it shards the transformer's weights across "
            "ranks, but the pack patches LoRAs into whole weights in place (fused mode) and the trained LoRA "
            "hooks whole Linear layers. The base model is frozen and the LoRA is small: use data-parallel "
            "(configs/accelerate/ddp.yaml or torchrun), where every rank holds the whole model.")
    stage = _deepspeed_zero_stage()
    if stage is not None and stage >= 3:
        raise UnsupportedEngineError(
            f"DeepSpeed ZeRO stage {stage} is not supported for reward-LoRA training: it shards the "
            "transformer's weights, which breaks fused LoRA patching (in-place weight writes) and the trained "
            "LoRA's hooks. Use ZeRO stage 2 or lower (configs/accelerate/deepspeed_zero2.yaml) or "
            "data-parallel (configs/accelerate/ddp.yaml).")
    return "deepspeed" if stage is not None else "ddp"


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 when started as a plain process)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class DataParallel:
    """Rank, world size and the few collectives the trainer needs. The default instance is a
    single process (rank 0 of 1): every method is then a no-op, so the trainer's code path is
    the same with and without a launcher."""

    def __init__(self, accelerator=None, engine: str = "single"):
        self.accelerator = accelerator
        self.engine = engine
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.local_rank = accelerator.local_process_index if accelerator is not None else 0
        self.world_size = accelerator.num_processes if accelerator is not None else 1
        self.device = accelerator.device if accelerator is not None else None
        self.comm_seconds = 0.0  # time spent in collectives (the benchmark's communication share)
        self.comm_calls = 0

    @classmethod
    def from_environment(cls, device: str | torch.device | None = None) -> "DataParallel":
        """Join the process group a launcher set up (WORLD_SIZE > 1); else one process. `device`
        'cpu' selects gloo on the CPU, anything else lets accelerate pick the rank's GPU."""
        engine = check_engine()
        if launched_world_size() == 1:
            return cls()
        from accelerate import Accelerator

        cpu = device is not None and torch.device(device).type == "cpu"
        accelerator = Accelerator(cpu=cpu)
        if accelerator.num_processes == 1:
            raise RuntimeError(f"WORLD_SIZE is {launched_world_size()} but accelerate set up a single process; "
                               "on CPU pass --device cpu (gloo), on GPUs launch with --multi_gpu")
        if engine == "deepspeed":
            log.warning("DeepSpeed launcher: the trainer averages the LoRA gradients itself (data-parallel); "
                        "ZeRO's partitioning of optimizer state and gradients is not applied to the LoRA")
        return cls(accelerator, engine)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- work split ----------------------------------------------------------------------------

    def first_of_rank(self, first: int, per_rank: int) -> int:
        """Global index of this rank's first item in a global batch starting at `first`."""
        return first + self.rank * per_rank

    def shard(self, count: int) -> list[int]:
        """This rank's share of `count` items: i with i mod world_size == rank."""
        return list(range(self.rank, count, self.world_size))

    # -- collectives ---------------------------------------------------------------------------

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = self.accelerator.reduce(tensor, reduction="sum")
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.comm_seconds += time.perf_counter() - started
        self.comm_calls += 1
        return out

    def average_gradients(self, params: Iterable[torch.nn.Parameter], *values: float) -> tuple[float, ...]:
        """Average the parameters' gradients over the ranks in place (a parameter that got no
        gradient on any rank keeps None, as in one process) and return `values` averaged too."""
        if not self.active:
            return tuple(float(v) for v in values)
        params = list(params)
        device = params[0].device if params else self.device
        head = torch.tensor([0.0 if p.grad is None else 1.0 for p in params] + [float(v) for v in values],
                            dtype=torch.float64, device=device)
        head = self._reduce_sum(head)
        with_grad = head[:len(params)].tolist()
        averaged = tuple(v / self.world_size for v in head[len(params):].tolist())
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for param, count in zip(params, with_grad):
            if count == 0:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            bucket.append(param)
            size += param.numel()
            if size >= BUCKET_ELEMENTS:
                self._average_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._average_bucket(bucket)
        return averaged

    def _average_bucket(self, params: Sequence[torch.nn.Parameter]) -> None:
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        flat = self._reduce_sum(flat).div_(self.world_size)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def gather_rows(self, indices: Sequence[int], chunks: Sequence[torch.Tensor], total: int) -> torch.Tensor:
        """Rows this rank computed for global `indices` (concatenated `chunks`) -> all `total` rows
        in index order, on every rank (float32, CPU when gathered)."""
        local = torch.cat(list(chunks)) if chunks else None
        if not self.active:
            return local
        rows = [] if local is None else local.detach().float().cpu().tolist()
        parts = self.gather_objects([(list(indices), rows)])
        ordered: list = [None] * total
        for part_indices, part_rows in parts:
            for i, row in zip(part_indices, part_rows):
                ordered[i] = row
        missing = [i for i, row in enumerate(ordered) if row is None]
        if missing:
            raise RuntimeError(f"held-out rows {missing[:5]} came back from no rank")
        return torch.tensor(ordered, dtype=torch.float32)

    def gather_objects(self, items: list) -> list:
        """Every rank's `items` (picklable), concatenated in rank order, on every rank."""
        if not self.active:
            return list(items)
        from accelerate.utils import gather_object

        started = time.perf_counter()
        gathered = gather_object(list(items))
        self.comm_seconds += time.perf_counter() - started
        self.comm_calls += 1
        return gathered

    def barrier(self) -> None:
        if self.active:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Leave the process group (without waiting for ranks that may be gone)."""
        if self.active and torch.distributed.is_available() and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()


SINGLE_PROCESS = DataParallel()


# -- stops ---------------------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C."""


_held = threading.local()
_pending: list[int] = []


def _raise_for(signum: int):
    if signum == signal.SIGTERM:
        raise Terminated("SIGTERM")
    raise KeyboardInterrupt


def _on_signal(signum, frame):
    if getattr(_held, "depth", 0) > 0:
        _pending.append(signum)
        return
    _raise_for(signum)


def install_stop_signals():
    """SIGINT and SIGTERM raise (KeyboardInterrupt / Terminated) in the main thread, except inside
    `critical()`, where they are held until it ends. For the CLI; the ComfyUI node never calls it.
    Returns a function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


@contextlib.contextmanager
def critical():
    """A section that a stop signal must not cut in half (the optimizer step)."""
    _held.depth = getattr(_held, "depth", 0) + 1
    try:
        yield
    finally:
        _held.depth -= 1
        if _held.depth == 0 and _pending and threading.current_thread() is threading.main_thread():
            signum = _pending[0]
            _pending.clear()
            _raise_for(signum)
