"""What the controller and the balancer agree on, and nothing else.

The two components never import each other (an import-linter contract says so); they meet here:

    signals.py      the balancer -> controller report served at `GET /signals` (pydantic, versioned)
    clock.py        the only place that reads time; `FakeClock` for tests and the simulator
    pod_annotations.py  the pod annotations the controller writes and the balancer reads (drain, capacity weight)

Nothing here does I/O or imports a sibling package.
"""
