"""Static discovery: the backends file, reloaded when it changes.

The file (YAML, or JSON by its `.json` suffix) lists `backends: [{address, weight, pod, max_streams, drain,
methods}]`. It is read once at startup (an invalid file stops the start with a message naming the problem), then
checked every `reload_interval_s` (mtime, inode and size); a change replaces the file's backends in the pool (joiners warm up, leavers
finish their streams, weights and drain marks apply at once). A file that becomes invalid is logged and
ignored: the last good set stays, so a typo during an edit never empties the balancer.

Polling the file's (mtime, size) is deliberate: it works for ConfigMap volumes, whose atomic symlink swaps
inotify-based watchers miss, and costs one stat per second.

What this module does not do: Kubernetes (endpointslices.py) or validation rules (config.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from balancer import config as config_mod
from balancer.errors import ConfigError
from balancer.runtime import Balancer

log = logging.getLogger(__name__)

SOURCE = "file"


class FileSource:
    """Loads the backends file into the pool when it changes."""

    def __init__(self, bal: Balancer, path: Path) -> None:
        self.bal = bal
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self.last_error: str | None = None

    def load(self, *, initial: bool = False) -> None:
        """Read the file and sync the pool. Raises ConfigError (the pool is left untouched)."""
        stamp = self._stamp()
        parsed = config_mod.load_backends_file(self.path)
        self.bal.pool.sync(parsed.backends, source=SOURCE, initial=initial)
        self._seen = stamp
        self.last_error = None

    def changed(self) -> bool:
        return self._stamp() != self._seen

    async def watch(self) -> None:
        """Reload on change forever (a background task)."""
        while True:
            await self.bal.clock.sleep(self.bal.config.reload_interval_s)
            if not self.changed():
                continue
            try:
                self.load()
                log.info("reloaded backends file %s: %d backends", self.path, len(self.bal.pool.present()))
            except ConfigError as exc:
                self._seen = self._stamp()
                self.last_error = str(exc)
                log.error("keeping the previous backends: %s", exc)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)
