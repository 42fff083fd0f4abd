"""Make a transformer compute base + sum(strength_i * delta_i) for a stack of LoRAs, and undo it.

One `LoraPatcher` per pipe (`get_patcher(pipe)`). `sync(transformer, loras, mode)` brings the
transformer to exactly the requested stack, doing only the work that differs from what is patched:

- "fused": the first time a weight is touched, a CPU copy of it (original dtype, e.g. bf16 or
  float8_e4m3fn) is kept while it stays patched. The patched weight is always recomputed FROM THAT COPY:
  cast(backup.float() + sum strength * scale * up @ down). Nothing is ever subtracted, so strength
  changes cannot drift, and restoring copies the backup back: bitwise the original weights.
  Costs one extra copy of the touched weights in CPU RAM. Inference runs at base speed.
- "unfused": a forward hook on each targeted Linear adds strength * scale * up(down(x)); base
  weights are never written, removal is instant and exact. The LoRA tensors move to the input's
  device when first used there. Recommended for float8 weights (a fused delta is mostly lost in
  fp8 rounding) and for quick strength exploration; costs two small matmuls per Linear per forward.

Under the offload memory modes (weights rest in CPU RAM and move to the GPU to run) the fused
mode patches ON THE DEVICE, as ComfyUI does: the resting CPU weight stays the original (it is the
backup, so none is taken), and each time a module, block or leaf moves in, the placement tells
the patcher (`moving_in` / `moved_in` / `moving_out`), which merges into the device copy from
the CPU original and drops that copy on the way out. Peak RAM is then the weights alone (not
weights + backups: about 22 instead of 44 GiB for a fully covered bf16 12b); the price is one
merge per move-in (once per sampler call for whole-module offload, per forward for block swap
and sequential offload).

Works under every memory mode of easyanimate/memory.py: weights are accessed through the module
each time (offload hooks replace `param.data`), patched in place on whatever device they rest on,
and float8 weights are merged in float32 and re-quantised (with saturation to the fp8 range).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .lora_format import LoraModule
from .lora_hook import LinearDeltaHook
from .memory import copy_saturating_

MODES = ("fused", "unfused")
# Used when neither the sync call nor the LoRA (LoraWeights.mode) names a mode.
DEFAULT_MODE = "fused"

# fp32 work buffer per chunk of rows, in elements. Large on purpose: each chunk is a few parallel
# regions, and on a busy CPU every region waits for all threads, so fewer, bigger chunks win over
# cache-sized ones (measured); 2**26 holds a whole 12b feed-forward weight (151 MB).
_CPU_CHUNK_ELEMENTS = 1 << 26
_DEVICE_CHUNK_ELEMENTS = 1 << 28

Progress = Callable[[int, int], None]


def _autograd_usable(t: torch.Tensor) -> torch.Tensor:
    # Tensors made under ComfyUI's inference mode cannot be saved for backward; a trainer may run
    # on top of these adapters, so keep normal tensors only.
    return t.clone() if t.is_inference() else t


# One term of a module's update: (LoRA, coefficient = strength * alpha / rank).
Term = tuple[LoraModule, float]


def stack_terms(loras: Iterable) -> dict[str, list[Term]]:
    """{diffusers module path: [(LoraModule, strength * alpha / rank), ...]} of a LoRA stack
    (AppliedLora-like objects with .weights and .strength); zero strengths are left out."""
    terms: dict[str, list[Term]] = {}
    for applied in loras:
        strength = float(applied.strength)
        if strength == 0.0:
            continue
        for path, lora in applied.weights.modules.items():
            terms.setdefault(path, []).append((lora, strength * lora.scale))
    return terms


def _same_terms(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(la is lb and ca == cb for (la, ca), (lb, cb) in zip(a, b))


class Workspace:
    """Reusable float32 scratch memory for merges on the CPU. Fresh large allocations are returned
    to the OS when freed and page-fault again on the next merge, which costs more than the merge
    arithmetic itself; one buffer reused across weights avoids that. (Accelerator allocators
    cache on their own, so device scratch is not kept.)"""

    def __init__(self):
        self._flat: torch.Tensor | None = None

    def take(self, device: torch.device, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        sizes = [rows * cols for rows, cols in shapes]
        total = sum(sizes)
        if device.type != "cpu":
            flat = torch.empty(total, dtype=torch.float32, device=device)
        else:
            if self._flat is None or self._flat.numel() < total:
                # A normal tensor even when the first merge runs inside ComfyUI's inference mode:
                # an inference tensor could not be written by a later merge outside it (training).
                with torch.inference_mode(False):
                    self._flat = torch.empty(total, dtype=torch.float32)
            flat = self._flat
        views, offset = [], 0
        for shape, size in zip(shapes, sizes):
            views.append(flat[offset: offset + size].view(shape))
            offset += size
        return views


def merged_weight_(
    weight: torch.Tensor,
    base: torch.Tensor,
    terms: Sequence[Term],
    chunk_elements: int | None = None,
    workspace: Workspace | None = None,
) -> None:
    """weight <- cast(base.float() + sum coef * up @ down), in row chunks, on weight's device.
    `base` may live elsewhere (a CPU backup); `weight` is written in place."""
    device = weight.device
    rows, cols = weight.shape
    if chunk_elements is None:
        chunk_elements = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    chunk = max(1, min(rows, chunk_elements // max(cols, 1)))
    shapes = [(chunk, cols)]
    for lora, _ in terms:
        shapes += [tuple(lora.up.shape), tuple(lora.down.shape)]
    buffer, *factor_buffers = (workspace or Workspace()).take(device, shapes)
    factors = []
    for i, (lora, coef) in enumerate(terms):
        up, down = factor_buffers[2 * i], factor_buffers[2 * i + 1]
        up.copy_(lora.up)
        down.copy_(lora.down)
        factors.append((up, down, coef))
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        work = buffer[: stop - start]
        work.copy_(base[start:stop])  # upcast (and host-to-device copy when base is a CPU backup)
        for up, down, coef in factors:
            work.addmm_(up[start:stop], down, alpha=coef)
        copy_saturating_(weight[start:stop], work)


class _LoraAdapterHook(LinearDeltaHook):
    """Adds sum coef * up(down(x)) to a Linear's output, without touching its weight.
    Several LoRAs on one Linear are concatenated along the rank, so one pair of matmuls serves the
    whole stack; the coefficients scale the small rank-R intermediate. A single LoRA is used without
    copying its tensors (the file's own bf16 tensors when the activations are bf16 on CPU)."""

    def __init__(self, terms: Sequence[Term], keep_on_device: bool):
        with torch.inference_mode(False):
            if len(terms) == 1:
                self.down, self.up = (_autograd_usable(t) for t in (terms[0][0].down, terms[0][0].up))
            else:
                dtype = torch.promote_types(terms[0][0].down.dtype, terms[0][0].up.dtype)
                self.down = torch.cat([lora.down.to(dtype) for lora, _ in terms], dim=0)  # (R, in)
                self.up = torch.cat([lora.up.to(dtype) for lora, _ in terms], dim=1)  # (out, R)
            self.coefs = torch.cat([torch.full((lora.rank,), coef, dtype=torch.float32) for lora, coef in terms])
        self.keep_on_device = keep_on_device
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _factors(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        with torch.inference_mode(False):
            factors = tuple(_autograd_usable(t.to(device, dtype, non_blocking=True))
                            for t in (self.down, self.up, self.coefs))
        if self.keep_on_device or device.type == "cpu":
            self._cache[key] = factors
        return factors

    def drop_device_copies(self) -> None:
        """Forget the copies made on an accelerator (they are rebuilt on the next forward)."""
        self.keep_on_device = False
        self._cache = {key: value for key, value in self._cache.items() if key[0].type == "cpu"}

    def delta(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        down, up, coefs = self._factors(output.device, output.dtype)
        return nn.functional.linear(nn.functional.linear(x, down) * coefs, up)


@dataclass
class _Fused:
    signature: tuple  # of the terms currently merged into the weight


class LoraPatcher:
    """Owns what is patched into one transformer right now. See the module docstring."""

    def __init__(self, keep_adapters_on_device: bool = True):
        # path -> CPU copy of the untouched weight (original dtype), kept while the weight is patched
        self._backups: dict[str, torch.Tensor] = {}
        self._fused: dict[str, _Fused] = {}
        self._adapters: dict[str, tuple[tuple, torch.utils.hooks.RemovableHandle, _LoraAdapterHook]] = {}
        self._transformer_ref: weakref.ref | None = None
        # The last synced request, holding references (compared with `is`) so ids cannot be reused.
        self._last_request: tuple | None = None
        self._lock = threading.RLock()
        # False under sequential offload: adapter tensors then move to the device per forward
        # instead of staying there.
        self.keep_adapters_on_device = keep_adapters_on_device
        self._workspace = Workspace()
        # Patch on the device as modules move in (see the module docstring); get_patcher sets it
        # when the pipe's weights rest off the compute device, before anything is patched.
        self.patch_on_move = False
        self._path_of: dict[int, str] = {}  # id(Linear) -> path, for fused targets
        self._pending: dict[str, torch.Tensor] = {}  # path -> resting weight, between moving_in and moved_in
        self._moved: dict[str, tuple[nn.Module, torch.Tensor]] = {}  # path -> (Linear, resting weight) while in
        self.work_done = 0  # number of weights rewritten / hooks (re)installed; for tests and logs

    # -- public ---------------------------------------------------------------------------------

    @property
    def is_patched(self) -> bool:
        return bool(self._fused or self._adapters)

    @property
    def backup_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._backups.values())

    def sync(
        self,
        transformer: nn.Module,
        loras: Iterable = (),
        mode: str | None = None,
        progress: Progress | None = None,
    ) -> bool:
        """Make `transformer` compute base + sum over `loras` (AppliedLora: .weights, .strength).
        `mode`: "fused" | "unfused" for the whole stack; None = each LoRA's `weights.mode`, else
        DEFAULT_MODE. Returns False when nothing had to change (same stack as the last call)."""
        loras = tuple(loras)
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown LoRA patch mode {mode!r}; choose one of {', '.join(MODES)}")
        with self._lock:
            self._check_transformer(transformer)
            request = (mode, tuple((lora.weights, float(lora.strength)) for lora in loras))
            if self._same_request(request):
                return False
            fused_targets, unfused_targets = self._targets(loras, mode)
            linears = self._linears(transformer, set(fused_targets) | set(unfused_targets) | set(self._fused))
            self._check_shapes(linears, fused_targets, unfused_targets)
            total = len(set(self._fused) | set(fused_targets)) + len(set(self._adapters) | set(unfused_targets))
            step = _Stepper(progress, total)
            with torch.no_grad():
                self._sync_adapters(linears, unfused_targets, step)
                self._sync_fused(linears, fused_targets, step)
            self._last_request = request
            return True

    def restore(self, transformer: nn.Module) -> None:
        """Back to the base weights: bitwise for fused weights, hooks removed."""
        self.sync(transformer, ())

    def drop_device_copies(self) -> None:
        """Free the accelerator copies of unfused adapters (when the transformer leaves the GPU for
        good); from then on the adapters move to the device per forward, like the weights."""
        self.keep_adapters_on_device = False
        for _signature, _handle, hook in self._adapters.values():
            hook.drop_device_copies()

    # -- internals ------------------------------------------------------------------------------

    def _check_transformer(self, transformer: nn.Module) -> None:
        current = self._transformer_ref() if self._transformer_ref is not None else None
        if current is None:
            self._transformer_ref = weakref.ref(transformer)
            self._backups.clear()
            self._fused.clear()
            self._adapters.clear()
            self._path_of.clear()
            self._pending.clear()
            self._moved.clear()
            self._last_request = None
        elif current is not transformer:
            raise ValueError("this LoraPatcher belongs to another transformer; use one patcher per pipe")

    def _same_request(self, request: tuple) -> bool:
        last = self._last_request
        if last is None or last[0] != request[0] or len(last[1]) != len(request[1]):
            return False
        return all(a is b and sa == sb for (a, sa), (b, sb) in zip(last[1], request[1]))

    @staticmethod
    def _targets(loras: Sequence, mode: str | None) -> tuple[dict[str, list[Term]], dict[str, list[Term]]]:
        by_mode: dict[str, list] = {"fused": [], "unfused": []}
        for applied in loras:
            chosen = mode or getattr(applied.weights, "mode", None) or DEFAULT_MODE
            if chosen not in MODES:
                raise ValueError(f"LoRA {applied.name!r}: unknown patch mode {chosen!r}")
            by_mode[chosen].append(applied)
        return stack_terms(by_mode["fused"]), stack_terms(by_mode["unfused"])

    @staticmethod
    def _linears(transformer: nn.Module, paths: set[str]) -> dict[str, nn.Module]:
        linears = {}
        for path in paths:
            try:
                module = transformer.get_submodule(path)
            except AttributeError as e:
                raise ValueError(f"LoRA targets {path!r}, which this transformer does not have") from e
            if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.ndim != 2:
                raise ValueError(f"LoRA target {path!r} is a {type(module).__name__}, not a Linear")
            linears[path] = module
        return linears

    @staticmethod
    def _check_shapes(linears: dict[str, nn.Module], *targets: dict[str, list[Term]]) -> None:
        # Checked before anything is written, so a bad stack leaves the model as it was.
        for target in targets:
            for path, terms in target.items():
                out_features, in_features = linears[path].weight.shape
                for lora, _ in terms:
                    if (lora.out_features, lora.in_features) != (out_features, in_features):
                        raise ValueError(f"LoRA for {path} is {lora.in_features}->{lora.out_features} but the "
                                         f"model's layer is {in_features}->{out_features}; it was made for "
                                         "another model (load it with load_lora_file to see which)")

    def _sync_adapters(self, linears: dict[str, nn.Module], targets: dict[str, list[Term]], step) -> None:
        for path in list(self._adapters):
            if path not in targets:
                self._adapters.pop(path)[1].remove()
                self.work_done += 1
                step()
        for path, terms in targets.items():
            signature = tuple(terms)  # holds the LoraModules themselves (compared with `is`)
            current = self._adapters.get(path)
            if current is not None and _same_terms(current[0], signature):
                step()
                continue
            if current is not None:
                current[1].remove()
            hook = _LoraAdapterHook(terms, self.keep_adapters_on_device)
            self._adapters[path] = (signature, hook.attach(linears[path]), hook)
            self.work_done += 1
            step()

    def _sync_fused(self, linears: dict[str, nn.Module], targets: dict[str, list[Term]], step) -> None:
        if self.patch_on_move:
            self._sync_fused_on_move(linears, targets, step)
            return
        for path in list(self._fused):
            if path not in targets:
                self._restore_one(linears[path], path)
                step()
        for path, terms in targets.items():
            signature = tuple(terms)  # holds the LoraModules themselves (compared with `is`)
            current = self._fused.get(path)
            if current is not None and _same_terms(current.signature, signature):
                step()
                continue
            weight = linears[path].weight
            backup = self._backup_of(path, weight)
            merged_weight_(weight.data, backup, terms, workspace=self._workspace)
            self._fused[path] = _Fused(signature)
            self.work_done += 1
            step()

    # -- patching on the device as weights move in (offload modes) -----------------------------

    def _sync_fused_on_move(self, linears: dict[str, nn.Module], targets: dict[str, list[Term]], step) -> None:
        # Resting weights are never written: only what is on the device right now is re-merged.
        for path in list(self._fused):
            if path not in targets:
                del self._fused[path]
                self._path_of.pop(id(linears[path]), None)
                moved = self._moved.pop(path, None)
                if moved is not None:  # on the device now: the original back into its device copy
                    copy_saturating_(moved[0].weight.data, moved[1].to(moved[0].weight.device, torch.float32))
                self.work_done += 1
                step()
        for path, terms in targets.items():
            signature = tuple(terms)  # holds the LoraModules themselves (compared with `is`)
            current = self._fused.get(path)
            if current is None or not _same_terms(current.signature, signature):
                self._fused[path] = _Fused(signature)
                self._path_of[id(linears[path])] = path
                if path in self._moved:
                    module, resting = self._moved[path]
                    merged_weight_(module.weight.data, resting, terms, workspace=self._workspace)
                self.work_done += 1
            step()

    def _fused_in(self, root: nn.Module, skip: Callable[[nn.Module], bool] | None = None):
        stack = [root]
        while stack:
            sub = stack.pop()
            if skip is not None and skip(sub):
                continue  # moves on its own (a streamed block)
            path = self._path_of.get(id(sub))
            if path is not None and path in self._fused:
                yield path, sub
            stack.extend(sub.children())

    def moving_in(self, root: nn.Module, skip: Callable[[nn.Module], bool] | None = None) -> None:
        """`root` (but the subtrees `skip` names) is about to move to the compute device:
        remember its fused Linears' resting weights."""
        with self._lock:
            for path, sub in self._fused_in(root, skip):
                if path not in self._moved:
                    self._pending[path] = sub.weight.data

    def moved_in(self, root: nn.Module, skip: Callable[[nn.Module], bool] | None = None) -> None:
        """`root` is on the compute device: merge the fused LoRAs into its device copies."""
        with self._lock, torch.no_grad(), torch.inference_mode(False):
            for path, sub in self._fused_in(root, skip):
                resting = self._pending.pop(path, None)
                if resting is None:
                    continue
                weight = sub.weight
                if weight.data.data_ptr() == resting.data_ptr():  # no copy was made (same device)
                    weight.data = torch.empty_like(resting)
                merged_weight_(weight.data, resting, self._fused[path].signature, workspace=self._workspace)
                self._moved[path] = (sub, resting)
                self.work_done += 1

    def moving_out(self, root: nn.Module, skip: Callable[[nn.Module], bool] | None = None) -> None:
        """`root` leaves the device: its fused Linears get their resting (original) weights back;
        the patched device copies are dropped, never copied back."""
        with self._lock, torch.inference_mode(False):
            for path, sub in self._fused_in(root, skip):
                moved = self._moved.pop(path, None)
                if moved is not None:
                    sub.weight.data = moved[1]
                self._pending.pop(path, None)

    def _backup_of(self, path: str, weight: torch.Tensor) -> torch.Tensor:
        backup = self._backups.get(path)
        if backup is None:  # first touch since the weight was last unpatched
            backup = weight.data.detach().to("cpu", copy=True)
            self._backups[path] = backup
        return backup

    def _restore_one(self, module: nn.Module, path: str) -> None:
        weight = module.weight.data
        backup = self._backups.pop(path)  # a backup lives only while its weight is patched
        if backup.dtype == weight.dtype:
            weight.copy_(backup)  # same dtype: a bitwise copy (across devices too)
        else:  # the weight was re-cast while patched (memory mode change): the base in the new dtype
            copy_saturating_(weight, backup.to(weight.device, torch.float32))
        del self._fused[path]
        self.work_done += 1


class _Stepper:
    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def get_patcher(pipe) -> LoraPatcher:
    """The pipe's patcher, created on first use (EasyAnimatePipe.lora_patcher)."""
    patcher = getattr(pipe, "lora_patcher", None)
    if patcher is None:
        placement = getattr(pipe, "placement", None)
        # Adapter copies stay on the GPU only while the transformer does (mode "none"); under the
        # offload modes they would hold VRAM while the VAE, rewards and other models run.
        resident = getattr(placement, "mode", None) == "none"
        patcher = LoraPatcher(keep_adapters_on_device=resident)
        if placement is not None and getattr(placement, "patches_on_move", False):
            patcher.patch_on_move = True  # fused LoRAs merge on the device as weights move in
            placement.add_move_listener(patcher)
        pipe.lora_patcher = patcher
    return patcher
