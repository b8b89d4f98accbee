"""The controller's errors: one base class, few subclasses, third-party errors translated at the seam.

    ForestallError
    ├── InvalidPolicy        a ScalingPolicy that fails validation (lines name field, value and fix)
    └── ClusterError         the Kubernetes API failed (`controller.kube.api` translates ApiException)
        ├── Conflict         409: stale resourceVersion; requeue and retry with a fresh read
        ├── NotFound         404: the object is gone
        ├── Forbidden        403: RBAC does not grant the call
        ├── Throttled        429 still refused after the retries; `retry_after_s` says when to come back
        └── Refused          the cluster holds something that makes the policy unsafe to act on; `reason`

Always `raise ... from exc` so the original error stays attached.
"""

from __future__ import annotations


class ForestallError(Exception):
    """Base of every error the controller raises on purpose."""


class InvalidPolicy(ForestallError, ValueError):
    """A ScalingPolicy failed validation; `lines` holds one message per problem."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("; ".join(lines))


class ClusterError(ForestallError):
    """The Kubernetes API failed in a way the caller did not ask for."""


class Conflict(ClusterError):
    """409 Conflict: the object changed since it was read; re-read and retry."""


class NotFound(ClusterError):
    """404 Not Found: the object does not exist (any more)."""


def one_line(text: str, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters: third-party error text quoted inside our messages."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Forbidden(ClusterError):
    """403 Forbidden: the controller's RBAC does not grant the call (or admission refused a pod)."""


class Throttled(ClusterError):
    """429 Too Many Requests after the retries; the caller waits at least `retry_after_s` before the next try."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class Refused(ClusterError):
    """The policy cannot be acted on safely as the cluster stands (e.g. a placeholder PriorityClass that would
    preempt real pods); `reason` is the condition reason to report."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)
