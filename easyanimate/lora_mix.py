"""Mix several LoRAs with weights into one LoRA file (e.g. 0.5 x HPS + 0.5 x MPS), instead of a
~24 GB merged model folder.

Exact mix: per module, the ranks are concatenated,

    down = [down_1; down_2; ...]                    (R x in),  R = r_1 + r_2 + ...
    up   = [w_1 s_1 up_1, w_2 s_2 up_2, ...]        (out x R), s_i = alpha_i / r_i
    alpha = R (scale 1; an R that bf16 cannot hold exactly is folded into up)

so up @ down = sum_i w_i s_i up_i @ down_i: applying the mix at strength 1 is applying every
LoRA at its weight. Exact in float32 (to float rounding); a bf16 file rounds each factor to 8
mantissa bits: relative error of the update 0.16% on the test LoRAs, stated bound 0.5%
(`rounding_error` reports it).
A module present in only some of the LoRAs gets only their ranks; per-module ranks are what the
official kohya format (and EasyAnimate's merge_lora, alpha / up.shape[1]) reads.

Reduced mix (`rank` r): per module the exact update is truncated to its r largest singular values
(QR of both factors, then an SVD of the small R x R core: no out x in matrix is formed), up = U S^1/2,
down = S^1/2 V^T, alpha = r. `MixReport` gives the relative Frobenius error per module and overall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .cancel import check_cancel
from .lora_format import LoraModule, LoraWeights

MIX_DTYPE = torch.float32


@dataclass
class MixReport:
    modules: int = 0
    ranks: dict[str, int] = field(default_factory=dict)  # module path -> rank in the mix
    relative_error: float = 0.0  # ||dW_mix - dW_exact||_F / ||dW_exact||_F over all modules
    max_module_error: float = 0.0
    worst_module: str = ""

    def describe(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        text = f"{self.modules} modules, rank {rank_text}; relative error {self.relative_error:.3g}"
        if self.max_module_error > 0:
            text += f" (worst {self.max_module_error:.3g} in {self.worst_module})"
        return text


def _unit_scale(down: torch.Tensor, up: torch.Tensor) -> LoraModule:
    """A module with scale alpha / rank = 1 as stored: alpha = rank rounded to bf16 (files store
    alpha in the file's dtype; 257 is not a bf16 number), the rounding folded into `up`."""
    rank = down.shape[0]
    alpha = float(torch.tensor(float(rank), dtype=torch.bfloat16))
    if alpha != rank:
        up = up * (rank / alpha)
    return LoraModule(down, up, alpha)


def _mix_module(parts: Sequence[tuple[LoraModule, float]]) -> LoraModule:
    downs = [m.down.to(MIX_DTYPE) for m, _ in parts]
    ups = [m.up.to(MIX_DTYPE) * (weight * m.scale) for m, weight in parts]
    shapes = {(m.in_features, m.out_features) for m, _ in parts}
    if len(shapes) > 1:
        raise ValueError(f"the LoRAs disagree on a module's shape: {sorted(shapes)} (made for different models?)")
    return _unit_scale(torch.cat(downs, dim=0), torch.cat(ups, dim=1))


def _reduce(module: LoraModule, rank: int) -> tuple[LoraModule, float, float]:
    """Best rank-`rank` approximation of scale * up @ down; (module, squared error, squared norm)."""
    up = module.up.double() * module.scale
    down = module.down.double()
    q_up, r_up = torch.linalg.qr(up)  # up = Q1 R1
    q_down, r_down = torch.linalg.qr(down.T)  # down^T = Q2 R2
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)  # dW = Q1 (U S V^T) Q2^T
    norm2 = float((s ** 2).sum())
    if rank >= s.numel():
        return module, 0.0, norm2
    kept = s[:rank].sqrt()
    new_up = (q_up @ u[:, :rank]) * kept
    new_down = kept[:, None] * (vh[:rank] @ q_down.T)
    error2 = float((s[rank:] ** 2).sum())
    return _unit_scale(new_down.to(MIX_DTYPE), new_up.to(MIX_DTYPE)), error2, norm2


def _combine(tables: Sequence[tuple[dict, float]], rank: int | None, report: MixReport) -> dict[str, LoraModule]:
    paths = list(dict.fromkeys(path for table, _ in tables for path in table))
    mixed: dict[str, LoraModule] = {}
    for path in paths:
        check_cancel()  # a 12b mix reduced by SVD is ~700 modules: Cancel between them
        parts = [(table[path], weight) for table, weight in tables if path in table and weight != 0]
        if not parts:
            continue
        module = _mix_module(parts)
        if rank is not None:
            module, error2, norm2 = _reduce(module, rank)
            report._error2 += error2
            report._norm2 += norm2
            relative = math.sqrt(error2 / norm2) if norm2 > 0 else 0.0
            if relative > report.max_module_error:
                report.max_module_error, report.worst_module = relative, path
        mixed[path] = module
        report.ranks[path] = module.rank
    return mixed


def mix_loras(loras: Sequence[tuple[LoraWeights, float]], rank: int | None = None) -> tuple[LoraWeights, MixReport]:
    """One LoRA whose update at strength 1 is sum_i weight_i x LoRA_i (see the module doc).
    `rank`: None for the exact mix, else reduce every module to at most that rank by SVD."""
    if not loras:
        raise ValueError("mixing needs at least one LoRA")
    for _, weight in loras:
        if not math.isfinite(float(weight)):
            raise ValueError(f"LoRA weights must be finite numbers, got {weight}")
    if rank is not None and int(rank) < 1:
        raise ValueError(f"the target rank must be >= 1 (or None for the exact mix), got {rank}")
    report = MixReport()
    report._error2, report._norm2 = 0.0, 0.0
    modules = _combine([(w.modules, float(k)) for w, k in loras], rank, report)
    text = _combine([(w.text_encoder_modules, float(k)) for w, k in loras], rank, report)
    if not modules and not text:
        raise ValueError("the mix is empty: every weight is 0")
    report.modules = len(modules) + len(text)
    if rank is not None and report._norm2 > 0:
        report.relative_error = math.sqrt(report._error2 / report._norm2)
    sources = ", ".join(f"{k:g} x {w.source or 'lora'}" for w, k in loras)
    metadata = {"easyanimate_reward_mix": sources, "easyanimate_reward_mix_rank": "exact" if rank is None else str(rank)}
    return LoraWeights(modules, text, source=f"mix({sources})", format="tensors", metadata=metadata), report


def delta(module: LoraModule) -> torch.Tensor:
    """scale x up @ down in float64 (for checks)."""
    return module.scale * (module.up.double() @ module.down.double())


def rounding_error(weights: LoraWeights, dtype: torch.dtype = torch.bfloat16) -> float:
    """Relative Frobenius error of all updates when the factors are stored in `dtype`."""
    error2 = norm2 = 0.0
    for module in list(weights.modules.values()) + list(weights.text_encoder_modules.values()):
        exact = delta(module)
        rounded = LoraModule(module.down.to(dtype), module.up.to(dtype), module.alpha)
        error2 += float((delta(rounded) - exact).pow(2).sum())
        norm2 += float(exact.pow(2).sum())
    return math.sqrt(error2 / norm2) if norm2 > 0 else 0.0
