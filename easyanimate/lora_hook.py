"""The pack's one hook-based LoRA adapter: a forward hook on a Linear that adds a low-rank
`delta(x)` to the layer's output and never writes its weight, so removing the hook is instant and
exact, whatever the base weight is (bf16, fp32, or float8 under qfloat8, whose forward upcasts).

Two kinds of delta share it: the patcher's unfused LoRA stacks (easyanimate/lora_patch.py: fixed
factors, a coefficient per rank row) and the trainer's trainable layers (training/lora_layers.py:
float32 parameters, one scale). Each says only how its delta is computed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class LinearDeltaHook:
    """Forward hook: output + delta(x), the input cast to the output's device and dtype first.
    Outputs that are not floating-point tensors (nothing a Linear returns) pass unchanged."""

    def delta(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, module: nn.Module, args, output):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        return output + self.delta(x.to(output.device, output.dtype), output)

    def attach(self, linear: nn.Module) -> RemovableHandle:
        return linear.register_forward_hook(self)
