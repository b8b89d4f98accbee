"""Pod annotations: how the controller talks to the balancer through Kubernetes itself.

The controller writes them on worker pods; the balancer (and the gateway endpoint picker) reads them from the
pods it watches. Keeping the names here, in the one module both import, means a rename cannot split the two.

What this module does not do: read or write any object (`controller.kube`, `balancer.endpointslices` do).
"""

from __future__ import annotations

from typing import Final

DRAIN: Final = "forestall.dev/drain"
"""Set on a pod the controller wants to remove; the value is the Unix time the drain started. The balancer
sends a pod so marked no new streams or sessions, and reports what is left on it."""

CAPACITY_WEIGHT: Final = "forestall.dev/capacity-weight"
"""A pod's relative decoding capacity (a positive number); the balancer normalises its load by it."""
