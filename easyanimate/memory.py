"""GPU memory modes: where each module's weights live, and when they move.

- "none": every module lives on the compute device.
- "model_cpu_offload": modules live on the offload device (CPU) and move to the compute device
  as a whole only while they are used (text encoders while encoding, the transformer while
  denoising, the VAE while decoding).
- "model_cpu_offload_and_qfloat8": as above, and the transformer's Linear weights are stored as
  float8_e4m3fn (half the bytes of bf16) and upcast to the activation dtype in each forward.
- "sequential_cpu_offload": leaf modules move to the compute device one at a time, in a hook
  around their forward. Weights stay real CPU tensors (never meta), so LoRA patching keeps working.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MEMORY_MODES = ("none", "model_cpu_offload", "model_cpu_offload_and_qfloat8", "sequential_cpu_offload")
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


def quantize_linears_to_float8(module: nn.Module) -> int:
    """Store every nn.Linear weight of `module` in float8_e4m3fn, upcast per forward. Returns count."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and sub.weight.dtype != FLOAT8:
            stored = torch.empty_like(sub.weight.data, dtype=FLOAT8)
            sub.weight.data = copy_saturating_(stored, sub.weight.data)
            sub.weight.requires_grad_(False)
            sub.forward = types.MethodType(_float8_linear_forward, sub)
            count += 1
    return count


class _SequentialOffloadHooks:
    """Moves a leaf module's own parameters and buffers in before its forward and out after it."""

    def __init__(self, device: torch.device, offload_device: torch.device):
        self.device, self.offload_device = device, offload_device

    def pre(self, module: nn.Module, args):
        _move_own_tensors(module, self.device)

    def post(self, module: nn.Module, args, output):
        _move_own_tensors(module, self.offload_device)


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


def _move(module: nn.Module, device: torch.device) -> None:
    # ComfyUI runs nodes under torch.inference_mode(); a move there would turn every weight into an
    # inference tensor, which autograd refuses to use, and reward training needs to.
    with torch.inference_mode(False):
        module.to(device)


class ModulePlacement:
    """Applies one GPU memory mode to a set of modules; `use(module)` brings one in while needed."""

    def __init__(self, mode: str, device: torch.device | str, offload_device: torch.device | str = "cpu"):
        if mode not in MEMORY_MODES:
            raise ValueError(f"unknown GPU memory mode {mode!r}; choose one of {', '.join(MEMORY_MODES)}")
        self.mode = mode
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self._hooks: list = []
        self._depth: dict[int, int] = {}  # id(module) -> nesting depth of use()

    @property
    def offloads_whole_modules(self) -> bool:
        return self.mode in ("model_cpu_offload", "model_cpu_offload_and_qfloat8")

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

    def _install_sequential_hooks(self, module: nn.Module) -> None:
        hooks = _SequentialOffloadHooks(self.device, self.offload_device)
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
        if module is None or not self.offloads_whole_modules or self.device == self.offload_device:
            yield
            return
        key = id(module)
        depth = self._depth.get(key, 0)
        if depth == 0:
            _move(module, self.device)
        self._depth[key] = depth + 1
        try:
            yield
        finally:
            self._depth[key] -= 1
            if self._depth[key] == 0:
                del self._depth[key]
                _move(module, self.offload_device)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
