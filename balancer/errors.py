"""The balancer's errors: one base class, few subclasses, third-party errors translated at the seam.

    BalancerError
    ├── ConfigError        bad flags, env, config or backends file (message names the field, value, fix)
    └── UpstreamError      a backend failed a stream; `reason` is the `streams_failed_total` label
        └── NoBackendError nothing eligible to take the stream (every backend draining, ejected or full)

What a client gets for each is decided in proxy.py (400/404/413 for bad input, 502/503/504 for upstream
trouble, always with a JSON body); these classes only carry the reason.
"""

from __future__ import annotations


class BalancerError(Exception):
    """Base of every error the balancer raises on purpose."""


class ConfigError(BalancerError):
    """Configuration that cannot be used; the message says which field, what it got and how to fix it."""


class UpstreamError(BalancerError):
    """A backend failed a stream (refused, reset, timed out, or answered an error)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        """Low-cardinality label: connect | timeout | reset | status_5xx | midstream | jsonrpc_error ..."""


class NoBackendError(UpstreamError):
    """No backend can take a new stream now."""
