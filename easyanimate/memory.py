"""GPU memory modes: where each module's weights live, and when they move.

- "none": every module lives on the compute device.
- "model_cpu_offload": modules live on the offload device (CPU) and move to the compute device
  as a whole only while they are used (text encoders while encoding, the transformer while
  denoising, the VAE while decoding).
- "model_cpu_offload_and_qfloat8": as above, and the transformer's Linear weights are stored as
  float8_e4m3fn (half the bytes of bf16) and upcast to the activation dtype in each forward, except
  the Linears the model keeps in high precision (norm* modulation, proj_out: its
  `_skip_layerwise_casting_patterns`).
- "sequential_cpu_offload": leaf modules move to the compute device one at a time, in a hook
  around their forward. Weights stay real CPU tensors (never meta), so LoRA patching keeps working.
- "block_swap_N" (N in BLOCK_SWAP_RESIDENT; "block_swap" + resident_blocks from Python): as
  model_cpu_offload, except that only the first N (`resident_blocks`) transformer blocks (and
  the transformer's small non-block parts) move in with the transformer; the other blocks stay in (pinned,
  on CUDA) CPU memory and stream in per forward, the next one prefetched on a side stream while
  the current one computes (`_BlockSwap`). Much faster than sequential
  offload (one copy per block instead of per leaf, overlapped with compute), far less VRAM than
  model_cpu_offload.

Block swap uses its own hooks, not diffusers' `enable_group_offload(offload_type="block_level")`:
group offload has no "keep N blocks resident", needs CUDA for its streams and pinned memory, and
on offload restores `param.data` from the CPU copy it took when it was enabled, so a fused LoRA
patched in afterwards (written wherever the weight rests) would be lost or undone. Here a swapped
block's CPU tensor IS its weight between forwards: the LoRA patcher writes into it (strength
changes included), the move in copies whatever it holds, the move out just drops the device copy
(weights are not written during a forward, so nothing is copied back). Training works: a swapped
block comes back for its own backward (backward pre-hook) and leaves after it; under gradient
checkpointing the recomputed forward brings it in like the first one.
"""

from __future__ import annotations

import contextlib
import re
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# block_swap_N: N transformer blocks stay on the compute device while the transformer is in use
BLOCK_SWAP_RESIDENT = (8, 16, 24, 32)
MEMORY_MODES = ("none", "model_cpu_offload", "model_cpu_offload_and_qfloat8", "sequential_cpu_offload") + tuple(
    f"block_swap_{n}" for n in BLOCK_SWAP_RESIDENT)
# What reward training runs under: every mode but sequential offload, whose per-leaf hooks move
# weights inside autograd (training/rollout.py hold_on_device refuses it).
TRAINING_MEMORY_MODES = tuple(m for m in MEMORY_MODES if m != "sequential_cpu_offload")
DEFAULT_RESIDENT_BLOCKS = 8  # plain "block_swap" (Python API) without resident_blocks


def parse_memory_mode(mode: str, resident_blocks: int | None = None) -> tuple[str, int | None]:
    """("block_swap", N) for "block_swap_N" (or "block_swap" + resident_blocks); (mode, None) else."""
    match = re.fullmatch(r"block_swap(?:_(\d+))?", str(mode))
    if match:
        if match.group(1) is not None:
            return "block_swap", int(match.group(1))
        return "block_swap", DEFAULT_RESIDENT_BLOCKS if resident_blocks is None else int(resident_blocks)
    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown GPU memory mode {mode!r}; choose one of {', '.join(MEMORY_MODES)}")
    return mode, None
FLOAT8 = torch.float8_e4m3fn


def _float8_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Weight stored in fp8; compute in the activation's dtype.
    return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def copy_saturating_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src), clamping to dst's range when dst is fp8 (a plain cast turns overflow into NaN)."""
    if is_float8(dst.dtype):
        limit = torch.finfo(dst.dtype).max
        src = src.float().clamp(-limit, limit)
    return dst.copy_(src)


def float8_skip_patterns(module: nn.Module) -> tuple[str, ...]:
    """The module paths the model keeps in its compute dtype under layerwise casting (diffusers'
    `_skip_layerwise_casting_patterns`; EasyAnimate: "^proj$", "norm", "^proj_out$", i.e. the
    norm* modulation Linears and the output projection)."""
    return tuple(getattr(module, "_skip_layerwise_casting_patterns", None) or ())


def _skipped(path: str, patterns: tuple[str, ...]) -> bool:
    # As diffusers applies them: a pattern searched in a module's path skips it and all below it.
    parts = path.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(re.search(pattern, prefix) for pattern in patterns for prefix in prefixes)


def quantize_linears_to_float8(module: nn.Module, skip_patterns: tuple[str, ...] | None = None) -> int:
    """Store the nn.Linear weights of `module` in float8_e4m3fn, upcast per forward, except the
    Linears the model keeps in high precision (`skip_patterns`, default `float8_skip_patterns`).
    Returns how many were converted.

    Not diffusers' `enable_layerwise_casting`: its hooks cast each whole module's parameters to
    the compute dtype before every forward and back after it, so while a module runs its
    `param.data` is a bf16 copy. The pack's LoRA patcher, the trainer's adapters and the offload
    hooks (sequential, block swap) all work on `param.data` and decide by `weight.dtype`; here the
    stored weight stays fp8 at all times and only F.linear sees a transient upcast copy. The skip
    list is the same one diffusers would use."""
    patterns = float8_skip_patterns(module) if skip_patterns is None else tuple(skip_patterns)
    count = 0
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and sub.weight.dtype != FLOAT8 and not _skipped(path, patterns):
            stored = torch.empty_like(sub.weight.data, dtype=FLOAT8)
            sub.weight.data = copy_saturating_(stored, sub.weight.data)
            sub.weight.requires_grad_(False)
            sub.forward = types.MethodType(_float8_linear_forward, sub)
            count += 1
    return count


class _SequentialOffloadHooks:
    """Moves a leaf module's own parameters and buffers in before its forward and out after it
    (telling the move listeners, e.g. the LoRA patcher, before and after)."""

    def __init__(self, device: torch.device, offload_device: torch.device, listeners: list):
        self.device, self.offload_device, self.listeners = device, offload_device, listeners

    def pre(self, module: nn.Module, args):
        _notify(self.listeners, "moving_in", module)
        _move_own_tensors(module, self.device)
        _notify(self.listeners, "moved_in", module)

    def post(self, module: nn.Module, args, output):
        _notify(self.listeners, "moving_out", module)
        _move_own_tensors(module, self.offload_device)


def _notify(listeners: list, event: str, module: nn.Module, skip=None) -> None:
    for listener in listeners:
        getattr(listener, event)(module, skip)


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    # Asynchronous only towards the GPU: a copy back to the CPU must be complete before anything
    # (a LoRA patch, the next forward) reads the CPU tensor.
    non_blocking = device.type != "cpu"
    with torch.inference_mode(False):  # see _move
        for p in module.parameters(recurse=False):
            if p.device != device:
                p.data = p.data.to(device, non_blocking=non_blocking)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device, non_blocking=non_blocking)


def _block_tensors(block: nn.Module) -> list[tuple[dict, str]]:
    """(owner's _parameters or _buffers dict, name) of every tensor of the block."""
    slots = []
    for sub in block.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in store.items():
                if t is not None:
                    slots.append((store, name))
    return slots


def _set(store: dict, name: str, value: torch.Tensor) -> None:
    current = store[name]
    if isinstance(current, nn.Parameter):
        current.data = value
    else:
        store[name] = value


class _BlockSwap:
    """Streams the transformer's blocks after the first `resident` from CPU memory, one at a time,
    each moved in before its forward (and its backward) and dropped from the device after it.
    On CUDA the CPU tensors are pinned and the next swapped block is copied on a side stream
    while the current one computes; elsewhere the moves are plain `.to()` calls (no-ops when the
    compute device is the CPU, but still counted in `moves_in` / `moves_out` for tests)."""

    def __init__(self, blocks: nn.ModuleList, resident: int, device: torch.device, listeners: list):
        self.device, self.listeners = device, listeners
        self.resident = max(0, min(int(resident), len(blocks)))
        self.swapped = list(blocks)[self.resident:]
        self._ids = {id(b) for b in self.swapped}
        self._slots = [_block_tensors(b) for b in self.swapped]
        self._home: dict[int, list[torch.Tensor]] = {}  # index -> CPU tensors while the block is in
        self._prefetched: dict[int, tuple[list[torch.Tensor], object]] = {}
        self._held: set[int] = set()  # blocks in for their backward (gradient checkpointing re-runs
        # their forward inside it, whose forward hook must not send them out)
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self.moves_in = self.moves_out = 0
        self._handles = []
        if self._cuda:
            self.pin()
        for i, block in enumerate(self.swapped):
            self._handles += [
                block.register_forward_pre_hook(lambda m, a, i=i: self.bring_in(i)),
                block.register_forward_hook(lambda m, a, o, i=i: self._after_forward(i)),
                block.register_full_backward_pre_hook(lambda m, g, i=i: self._hold_for_backward(i)),
                block.register_full_backward_hook(lambda m, gi, go, i=i: self._after_backward(i)),
            ]

    def owns(self, module: nn.Module) -> bool:
        return id(module) in self._ids

    def pin(self) -> None:
        with torch.inference_mode(False):
            for slots in self._slots:
                for store, name in slots:
                    t = store[name]
                    if t.device.type == "cpu" and not t.is_pinned():
                        _set(store, name, t.pin_memory())

    def _copy_in(self, i: int) -> list[torch.Tensor]:
        return [store[name].to(self.device, non_blocking=True) for store, name in self._slots[i]]

    def bring_in(self, i: int, prefetch: bool = True) -> None:
        if i in self._home:  # already in (a backward right after its forward, nested calls)
            return
        _notify(self.listeners, "moving_in", self.swapped[i])
        with torch.inference_mode(False):
            fetched = self._prefetched.pop(i, None)
            if fetched is not None:
                tensors, event = fetched
                torch.cuda.current_stream(self.device).wait_event(event)
                for t in tensors:
                    t.record_stream(torch.cuda.current_stream(self.device))
            else:
                tensors = self._copy_in(i)
            self._home[i] = [store[name] for store, name in self._slots[i]]
            for (store, name), t in zip(self._slots[i], tensors):
                _set(store, name, t)
        _notify(self.listeners, "moved_in", self.swapped[i])
        self.moves_in += 1
        if prefetch and self._cuda and len(self.swapped) > 1:
            self._prefetch((i + 1) % len(self.swapped))

    def _prefetch(self, j: int) -> None:
        if j in self._home or j in self._prefetched:
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(False), torch.cuda.stream(self._stream):
            tensors = self._copy_in(j)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._prefetched[j] = (tensors, event)

    def _after_forward(self, i: int) -> None:
        if i not in self._held:
            self.send_out(i)

    def _hold_for_backward(self, i: int) -> None:
        self.bring_in(i, prefetch=False)
        self._held.add(i)

    def _after_backward(self, i: int) -> None:
        self._held.discard(i)
        self.send_out(i)

    def send_out(self, i: int) -> None:
        home = self._home.pop(i, None)
        if home is None:
            return
        _notify(self.listeners, "moving_out", self.swapped[i])
        with torch.inference_mode(False):
            for (store, name), t in zip(self._slots[i], home):
                _set(store, name, t)  # weights are not written in a forward: drop the device copy
        self.moves_out += 1

    def release(self) -> None:
        """Everything back home, prefetched copies dropped (the transformer leaves the device)."""
        self._held.clear()
        for i in list(self._home):
            self.send_out(i)
        self._prefetched.clear()

    def remove(self) -> None:
        self.release()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _move_except(module: nn.Module, device: torch.device, swap: _BlockSwap) -> None:
    """Move `module` except the blocks `swap` streams (they stay home until their forward)."""
    def visit(sub: nn.Module) -> None:
        if swap.owns(sub):
            return
        _move_own_tensors(sub, device)
        for child in sub.children():
            visit(child)

    visit(module)


def _move(module: nn.Module, device: torch.device) -> None:
    # ComfyUI runs nodes under torch.inference_mode(); a move there would turn every weight into an
    # inference tensor, which autograd refuses to use, and reward training needs to.
    with torch.inference_mode(False):
        module.to(device)


class ModulePlacement:
    """Applies one GPU memory mode to a set of modules; `use(module)` brings one in while needed."""

    def __init__(self, mode: str, device: torch.device | str, offload_device: torch.device | str = "cpu",
                 resident_blocks: int | None = None):
        mode, resident = parse_memory_mode(mode, resident_blocks)
        if resident is not None and resident < 0:
            raise ValueError(f"resident_blocks must be 0 or more, got {resident}")
        self.mode = mode  # "block_swap_N" becomes mode "block_swap" with resident_blocks N
        self.resident_blocks = resident
        self.block_swap: _BlockSwap | None = None
        self._swapped_module: nn.Module | None = None
        self._move_listeners: list = []  # told before/after each move in and before each move out
        # Fused LoRAs are merged on the device as weights move in (easyanimate/lora_patch.py)
        # whenever the weights rest elsewhere; True forces it where compute and offload device are
        # one (tests and RAM benchmarks on the CPU: the "device" copy is then a second CPU tensor).
        self.force_patch_on_move = False
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self._hooks: list = []
        self._depth: dict[int, int] = {}  # id(module) -> nesting depth of use()

    @property
    def patches_on_move(self) -> bool:
        """Whether a fused LoRA should be merged into device copies as weights move in, leaving the
        resting (CPU) weights untouched: every mode whose weights rest off the compute device."""
        if self.mode == "none":
            return False
        return self.force_patch_on_move or self.device != self.offload_device

    def add_move_listener(self, listener) -> None:
        """`listener.moving_in(module, skip)`, `.moved_in(module, skip)`, `.moving_out(module, skip)`
        are called around every move of a module, streamed block or leaf (skip: a predicate naming
        sub-modules that do not move with it)."""
        if listener not in self._move_listeners:
            self._move_listeners.append(listener)

    @property
    def offloads_whole_modules(self) -> bool:
        return self.mode in ("model_cpu_offload", "model_cpu_offload_and_qfloat8", "block_swap")

    def prepare(self, modules: dict[str, nn.Module | None], transformer_key: str = "transformer") -> None:
        """Put freshly loaded modules where the mode wants them to rest."""
        if self.mode == "model_cpu_offload_and_qfloat8":
            quantize_linears_to_float8(modules[transformer_key])
        for module in modules.values():
            if module is None:
                continue
            if self.mode == "none":
                _move(module, self.device)
            elif self.mode == "sequential_cpu_offload":
                _move(module, self.offload_device)
                self._install_sequential_hooks(module)
            else:
                _move(module, self.offload_device)
        if self.mode == "block_swap":
            transformer = modules[transformer_key]
            blocks = getattr(transformer, "transformer_blocks", None)
            if not isinstance(blocks, nn.ModuleList):
                raise ValueError("block_swap needs a transformer with a transformer_blocks list")
            self.block_swap = _BlockSwap(blocks, self.resident_blocks, self.device, self._move_listeners)
            self._swapped_module = transformer

    def _install_sequential_hooks(self, module: nn.Module) -> None:
        hooks = _SequentialOffloadHooks(self.device, self.offload_device, self._move_listeners)
        for sub in module.modules():
            has_own = any(True for _ in sub.parameters(recurse=False)) or any(
                b is not None for b in sub._buffers.values()
            )
            if has_own:
                self._hooks.append(sub.register_forward_pre_hook(hooks.pre))
                self._hooks.append(sub.register_forward_hook(hooks.post))

    def demote(self, modules: list[nn.Module | None]) -> None:
        """Free the compute device of these modules now, yet keep them usable: a pipe that was
        resident on the GPU becomes a whole-module-offload pipe (used again, it moves in as needed)."""
        if self.mode == "block_swap" and self.block_swap is not None:
            self.block_swap.release()
        if self.mode == "none":
            self.mode = "model_cpu_offload"
            for module in modules:
                if module is not None:
                    _move(module, self.offload_device)

    @contextlib.contextmanager
    def use(self, module: nn.Module | None) -> Iterator[None]:
        """Module on the compute device for the duration of the block (no-op unless whole-module
        offload). Reentrant: only the outermost block moves the module, so a trainer can hold the
        transformer in across forward and backward while the sampler's own blocks nest inside."""
        if module is None or not self.offloads_whole_modules or not self.patches_on_move:
            yield  # nothing moves (also: compute and offload device are one)
            return
        key = id(module)
        depth = self._depth.get(key, 0)
        swap = self.block_swap if module is self._swapped_module else None
        skip = None if swap is None else swap.owns
        if depth == 0:
            _notify(self._move_listeners, "moving_in", module, skip)
            if swap is not None:
                _move_except(module, self.device, swap)
            else:
                _move(module, self.device)
            _notify(self._move_listeners, "moved_in", module, skip)
        self._depth[key] = depth + 1
        try:
            yield
        finally:
            self._depth[key] -= 1
            if self._depth[key] == 0:
                del self._depth[key]
                _notify(self._move_listeners, "moving_out", module, skip)
                if swap is not None:
                    swap.release()
                    _move_except(module, self.offload_device, swap)
                else:
                    _move(module, self.offload_device)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
