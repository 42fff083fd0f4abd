"""Trainable LoRA adapters on the transformer's Linear layers, attached with forward hooks.

The base weights are never written and never get a gradient: each targeted Linear's output gets
`scale * up(down(x))` added by the pack's one adapter hook (easyanimate/lora_hook.py). That works whatever the base weight is (bf16, fp32, or
float8 under the qfloat8 memory mode, whose Linear forward upcasts) and alongside LoRAs the pack's
patcher already applied (fused into the weights, or its own unfused hooks).

The trainable factors are float32 parameters even when the model runs in bf16: they are cast to
the activation dtype inside the forward (autograd casts the gradient back), so AdamW updates and
accumulates in float32 while activations stay in the model's dtype.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..easyanimate.keymap import diffusers_to_original
from ..easyanimate.lora_format import BLOCKS_KEY, LoraWeights, lora_target_modules, weights_from_tensors
from ..easyanimate.lora_hook import LinearDeltaHook


def select_target_paths(transformer: nn.Module, pattern: str = "") -> list[str]:
    """Diffusers module paths of the Linear layers to adapt. `pattern` is a regex searched in the
    diffusers path or in the original EasyAnimate path (attn2.* names), so either spelling works."""
    paths = list(lora_target_modules(transformer))
    if pattern:
        regex = re.compile(pattern)
        paths = [p for p in paths if regex.search(p) or regex.search(diffusers_to_original(p))]
        if not paths:
            raise ValueError(f"target_modules {pattern!r} matches no Linear layer of the transformer "
                             "(module paths look like 'transformer_blocks.0.attn1.to_q')")
    return paths


class _TrainableDelta(LinearDeltaHook):
    """The delta of one targeted Linear: scale * up(down(x)), factors cast to the activations'
    device and dtype inside the forward (autograd casts the gradient back to float32)."""

    def __init__(self, layers: "LoraLayers", index: int):
        self.layers, self.index = layers, index

    def delta(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        layers, index = self.layers, self.index
        down = layers.down[index].to(output.device, output.dtype)
        up = layers.up[index].to(output.device, output.dtype)
        return F.linear(F.linear(x, down), up) * layers.scale


class LoraLayers(nn.Module):
    """down (rank, in) and up (out, rank) per targeted Linear; delta = (alpha / rank) up @ down.

    Initialised like PEFT: down Kaiming-uniform, up zero, so the adapted model starts equal to the
    base. `attach` installs the hooks, `detach` removes them.
    """

    def __init__(self, transformer: nn.Module, rank: int, alpha: float, target_modules: str = "",
                 seed: int = 0, device: torch.device | str = "cpu", paths: Iterable[str] | None = None):
        super().__init__()
        linears = lora_target_modules(transformer)
        self.paths = list(paths) if paths is not None else select_target_paths(transformer, target_modules)
        missing = [p for p in self.paths if p not in linears]
        if missing:
            raise ValueError(f"no Linear layer {missing[0]!r} in the transformer")
        self.rank, self.alpha = int(rank), float(alpha)
        # The model's depth goes into every file this LoRA is saved to: the loader judges a partial
        # file of the pack's by it (a 36-block LoRA is not taken for a subset of a 48-block model).
        self.transformer_blocks = getattr(getattr(transformer, "config", None), "num_layers", None)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for path in self.paths:
            linear = linears[path]
            down = torch.empty(self.rank, linear.in_features)
            bound = 1.0 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)) bound
            down.uniform_(-bound, bound, generator=generator)
            self.down.append(nn.Parameter(down.to(device)))
            self.up.append(nn.Parameter(torch.zeros(linear.out_features, self.rank, device=device)))
        self._handles: list = []

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def attach(self, transformer: nn.Module) -> "LoraLayers":
        if self._handles:
            raise RuntimeError("LoRA layers are already attached")
        for index, path in enumerate(self.paths):
            module = transformer.get_submodule(path)
            self._handles.append(_TrainableDelta(self, index).attach(module))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def named_factors(self) -> list[tuple[str, nn.Parameter]]:
        """("<diffusers module path>.down" / ".up", parameter) for every factor: stable names for
        per-parameter state (the optimizer file), independent of the parameter order."""
        named = []
        for index, path in enumerate(self.paths):
            named += [(f"{path}.down", self.down[index]), (f"{path}.up", self.up[index])]
        return named

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def to_weights(self, metadata: dict | None = None) -> LoraWeights:
        """A CPU snapshot in the pack's LoRA type (diffusers paths), ready for save_lora_file."""
        tensors = {path: (self.down[i], self.up[i]) for i, path in enumerate(self.paths)}
        metadata = dict(metadata or {})
        if self.transformer_blocks is not None:
            metadata.setdefault(BLOCKS_KEY, str(self.transformer_blocks))
        return weights_from_tensors(tensors, self.alpha, metadata=metadata)

    @torch.no_grad()
    def load_weights(self, weights: LoraWeights) -> None:
        """Copy the factors of a loaded LoRA (same targets and rank) into these parameters."""
        if set(weights.modules) != set(self.paths):
            extra = sorted(set(weights.modules) - set(self.paths))[:3]
            lacking = sorted(set(self.paths) - set(weights.modules))[:3]
            raise ValueError(f"LoRA targets differ: file-only {extra}, trainer-only {lacking}")
        for index, path in enumerate(self.paths):
            module = weights.modules[path]
            if module.rank != self.rank or abs(module.alpha - self.alpha) > 1e-6 * max(1.0, abs(self.alpha)):
                raise ValueError(f"{path}: rank/alpha {module.rank}/{module.alpha} differ from {self.rank}/{self.alpha}")
            self.down[index].copy_(module.down.float())
            self.up[index].copy_(module.up.float())

    @classmethod
    def from_weights(cls, transformer: nn.Module, weights: LoraWeights,
                     device: torch.device | str = "cpu") -> "LoraLayers":
        """Trainable layers initialised from a saved LoRA (for resuming)."""
        ranks = weights.ranks
        alphas = {m.alpha for m in weights.modules.values()}
        if len(ranks) != 1 or len(alphas) != 1:
            raise ValueError(f"{weights.source}: resuming needs one rank and one alpha for every module; "
                             f"found ranks {sorted(ranks)}, alphas {sorted(alphas)}")
        # In the model's order, not the file's: the global gradient norm (clipping) sums the factors
        # in parameter order, so only the same order as a fresh run makes a resume exact.
        paths = [p for p in lora_target_modules(transformer) if p in weights.modules]
        paths += [p for p in weights.modules if p not in set(paths)]  # unknown ones: refused in __init__
        layers = cls(transformer, ranks.pop(), alphas.pop(), device=device, paths=paths)
        layers.load_weights(weights)
        return layers
