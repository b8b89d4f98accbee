"""Errors raised by the forecast package.

Bad input is a plain `ValueError` whose message names the problem, the value received and the fix, so the
caller (the controller, the CLI) can show it as it is. Asking a model for a forecast before it has seen data
raises `NotFittedError`, which is both a `ValueError` and an `AttributeError`, as in scikit-learn, so code
written against either convention catches it.
"""

from __future__ import annotations


class NotFittedError(ValueError, AttributeError):
    """`forecast()` or `update()` was called before `fit()`."""


class InsufficientHistory(ValueError):
    """A model cannot be fitted on this little history; `auto` skips it and tries the others."""
