"""The loss target and scale a run uses: its own max_reward / loss_scale, or the official
trainer's per-reward defaults (loss_preset "official").

The official values assume EasyAnimate's scores: HPS as the cosine, PickScore and MPS as the
plain cosine (no logit scale; `|r - 1|` with max_reward 1 makes sense only there), aesthetic
predictors on their 1-10 scale. A reward loaded with the pack's own PickScore / MPS scale (about
x100) would never come near max_reward 1, so the preset refuses it and names the fix.
"""

from __future__ import annotations

from .config import OFFICIAL_LOSS_PRESETS

# reward kind -> preset family
_FAMILIES = {"hps_v2": "hps", "hps_v2.1": "hps", "pickscore": "pickscore", "mps": "mps",
             "aesthetic_v2": "aesthetic", "aesthetic_v2.5": "aesthetic"}
_PLAIN_COSINE_NEEDED = ("pickscore", "mps")


def loss_settings(config, reward) -> tuple[float | None, float]:
    """(max_reward, loss_scale) for the run."""
    if config.loss_preset == "none":
        return config.max_reward, config.loss_scale
    kind = getattr(reward, "kind", None)
    family = _FAMILIES.get(kind)
    if family is None:
        known = ", ".join(sorted(_FAMILIES))
        raise ValueError(f"loss_preset 'official' has values for single official rewards ({known}); this reward is "
                         f"{getattr(reward, 'name', kind)!r}. Choose loss_preset 'none' and set max_reward / "
                         "loss_scale yourself.")
    if family in _PLAIN_COSINE_NEEDED and getattr(reward, "loader_options", {}).get("use_logit_scale", True):
        raise ValueError(f"loss_preset 'official' for {kind}: the official max_reward 1 assumes EasyAnimate's plain "
                         f"cosine score, but this {kind} reward scores with the logit scale (about x100). Load it with "
                         "scoring = easyanimate (Reward Loader / --scoring easyanimate), or choose loss_preset 'none'.")
    return OFFICIAL_LOSS_PRESETS[family]
