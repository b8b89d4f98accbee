"""row_nanmedian agrees with numpy's nanmedian on every path (no NaN, a few rows with NaN, many rows)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from forecast import models


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("nan_fraction", [0.0, 0.3, 1.0])
def test_row_nanmedian_matches_numpy(rows: int, nan_fraction: float) -> None:
    rng = np.random.default_rng(rows)
    a = rng.gamma(2.0, 3.0, size=(rows, 31))
    a[rng.random(a.shape) < nan_fraction] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns on all-NaN rows; ours stays silent
        expected = np.nanmedian(a, axis=1)
    np.testing.assert_array_equal(models.row_nanmedian(a), expected)
