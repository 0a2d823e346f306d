"""Preference objectives shared by the image and text sides."""

from diffalign.objectives.online import (
    d3po_loss,
    group_advantages,
    ppo_clip_loss,
    segment_dpo_loss,
    seppo_loss,
)
from diffalign.objectives.preference import (
    DPO_LOSS_TYPES,
    PreferenceOutput,
    dpo_loss,
    kto_loss,
    log1mexp,
    loss_terms,
    mapo_loss,
    mapo_odds,
    orpo_loss,
    sft_loss,
    simpo_loss,
)
from diffalign.objectives.ranked import (
    RankedOutput,
    delta_dcg_weights,
    ranked_dpo_loss,
    smoothed_beta_scale,
    smoothed_preference,
)

__all__ = [
    "d3po_loss",
    "group_advantages",
    "ppo_clip_loss",
    "segment_dpo_loss",
    "seppo_loss",
    "DPO_LOSS_TYPES",
    "PreferenceOutput",
    "dpo_loss",
    "kto_loss",
    "log1mexp",
    "loss_terms",
    "mapo_loss",
    "mapo_odds",
    "orpo_loss",
    "sft_loss",
    "simpo_loss",
]
__all__ += ["RankedOutput", "delta_dcg_weights", "ranked_dpo_loss", "smoothed_beta_scale", "smoothed_preference"]
