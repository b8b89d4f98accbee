"""Gradient-boosted quantile regression (placeholder until the model lands)."""

from __future__ import annotations

from forecast import models


def candidate(
    step_s: float, n_steps: int, *, global_model: object | None, season_steps: tuple[int, ...]
) -> models.Model | None:
    """The gbm candidate for a series, or None when there is too little data."""
    return None
