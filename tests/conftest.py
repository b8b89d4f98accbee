"""Shared test settings: markers by folder, and no test may leave asyncio tasks behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
"""The real public traces (see its README); tests that need them skip with a reason when it is absent."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test unit/integration/e2e by its folder, so `-m unit` selects the fast ones."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in ("unit", "integration", "e2e"):
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(autouse=True)
def _no_leftover_tasks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an async test that returns while tasks it started are still pending (a leak or a race)."""
    yield
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    current = asyncio.current_task(loop)
    leftover = [t for t in asyncio.all_tasks(loop) if t is not current and not t.done()]
    if leftover:
        pytest.fail(f"{request.node.name} left {len(leftover)} task(s) running: {leftover[:3]}")
