"""Typical score ranges of every reward kind, for documentation and for normalised combinations.

Learned models: the ranges their authors publish or that published comparisons report (random
tiny weights say nothing about them). Weight-free kinds: measured by
`benchmarks/reward_ranges.py` (10th-90th percentile over the 238 example images ComfyUI's
workflow-template packages install, 256x256; time-aware kinds on synthetic videos with known
motion). A range is "typical", not a bound: scores outside it are normal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TypicalRange:
    low: float
    high: float
    source: str

    def describe(self) -> str:
        return f"{self.low:.4g} .. {self.high:.4g} ({self.source})"


MEASURED = "measured: p10-p90 of 238 template images, 256 px (benchmarks/reward_ranges.py)"
SYNTHETIC = "measured: synthetic videos, static to 4 px/frame pans, 30% flicker (benchmarks/reward_ranges.py)"

RANGES: dict[str, TypicalRange] = {
    "hps_v2": TypicalRange(0.20, 0.30, "published: HPS v2 benchmark scores of text-to-image models about 0.22-0.29"),
    "hps_v2.1": TypicalRange(0.20, 0.35, "published: HPS v2.1 scores of text-to-image models, about 0.2-0.35"),
    "pickscore": TypicalRange(18.0, 23.0, "published: PickScore of text-to-image models about 18-23 (100 x cosine)"),
    "mps": TypicalRange(
        0.0, 20.0, "not published as an absolute range; MPS ranks pairs. Assumed like a 100 x CLIP-H cosine"),
    "aesthetic_v2": TypicalRange(4.0, 7.0, "published: LAION aesthetic scores, most images 4-7 on the 1-10 scale"),
    "aesthetic_v2.5": TypicalRange(4.0, 7.0, "published: aesthetic v2.5 scores, most images 4-7 on the 1-10 scale"),
    "colorfulness": TypicalRange(15.2, 80.4, MEASURED),
    "saturation": TypicalRange(0.106, 0.587, MEASURED),
    "contrast": TypicalRange(0.134, 0.277, MEASURED),
    "sharpness": TypicalRange(0.00066, 0.0030, MEASURED + "; pure noise 0.00043"),
    "compressibility": TypicalRange(-1.72, -0.694, MEASURED),
    "frame_difference": TypicalRange(-0.15, 0.0, SYNTHETIC + ": pans -0.036 to -0.13, flicker -0.15"),
    "motion": TypicalRange(0.0, 4.0, SYNTHETIC + ": pixels per frame, static 0, 4 px pan 3.99"),
    "temporal_consistency": TypicalRange(-0.15, 0.0, SYNTHETIC + ": pans -0.001 to -0.004, flicker -0.148"),
}
for _variant in ("raft_small", "raft_large"):
    RANGES[f"motion_{_variant}"] = TypicalRange(0.0, 4.0, "as 'motion' (pixels per frame; not measured with real RAFT weights)")
    RANGES[f"temporal_consistency_{_variant}"] = TypicalRange(
        -0.15, 0.0, "as 'temporal_consistency' (not measured with real RAFT weights)")

# Options that change the scale: the plain cosine is the x100 score / 100.
PLAIN_COSINE = {"pickscore": TypicalRange(0.18, 0.23, "published PickScore range / 100 (plain cosine)"),
                "mps": TypicalRange(0.0, 0.2, "assumed range / 100 (plain cosine)")}


def range_for(kind: str, options: dict | None = None) -> TypicalRange | None:
    options = options or {}
    if kind in PLAIN_COSINE and options.get("use_logit_scale") is False:
        return PLAIN_COSINE[kind]
    return RANGES.get(kind)


def typical_range(reward) -> TypicalRange | None:
    """The range a loaded reward carries (set by the registry), else the one of its name."""
    found = getattr(reward, "typical_range", None)
    if isinstance(found, TypicalRange):
        return found
    return RANGES.get(getattr(reward, "name", ""))
