"""List+watch caches of Kubernetes objects, each kept current by one thread.

A reconcile of 1,000 policies cannot afford a list of pods per policy per cycle, so the controller does what
client-go's informers do: list once, then watch from the list's `resourceVersion` and apply every event to an
in-memory store. Reads are dict lookups. A label index (`by_label`) finds a workload's pods without scanning
every pod in the namespace.

Lists are paginated (`LIST_PAGE_SIZE` items a request, `limit`/`continue`), so a large cluster is read in
bounded pieces. Watches ask for bookmarks (`allowWatchBookmarks`) so the resourceVersion to resume from stays fresh even on
a quiet resource, end after `WATCH_WINDOW_S` and resume from the last version seen; a `410 Expired` (history
compacted) or any failure means a fresh list, after a backoff. Objects are kept as the decoded JSON dicts.

Writers can put the object a write returned into the cache at once (`apply()`), so the next reconcile does
not act on its own stale view; an older version never replaces a newer one.

What this module does not do: decide or write anything; it has no opinion on which objects matter.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import watch
from kubernetes.client import exceptions as kube_exceptions

from controller import errors
from controller.kube import api

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]
"""(namespace, name); namespace is "" for cluster-scoped objects."""

WATCH_WINDOW_S = 300
"""Each watch request ends after this long and resumes from the last resourceVersion (like client-go's 5-10
minutes), so a connection silently dropped by a proxy is noticed."""

LIST_PAGE_SIZE = 500
"""Items per list request (client-go's pager default): a list of 10,000 pods arrives in 20 bounded answers
instead of one response the API server must build whole in memory (and may time out on)."""

RELIST_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
"""Waits before re-listing after consecutive failures; capped at 10 s so a restarted API server is picked up
within one reconcile interval."""


class Informer:
    """A cache of one resource (optionally one namespace, one label selector), fed by list+watch on a thread."""

    def __init__(
        self,
        list_fn: Callable[..., Any],
        *args: Any,
        name: str,
        label_selector: str | None = None,
        on_change: Callable[[str, Obj], None] | None = None,
    ) -> None:
        self.list_fn = list_fn
        self.args = args
        self.name = name
        self.label_selector = label_selector
        self.on_change = on_change
        self.synced = threading.Event()
        self.resource_version = ""
        self._items: dict[Key, Obj] = {}
        self._labels: dict[tuple[str, str, str], set[Key]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    # --- reads ---------------------------------------------------------------------------------------------

    def get(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._items.get((namespace, name))

    def items(self, namespace: str | None = None) -> list[Obj]:
        with self._lock:
            return [o for (ns, _), o in self._items.items() if namespace is None or ns == namespace]

    def by_label(self, namespace: str, labels: dict[str, str]) -> list[Obj]:
        """Objects in `namespace` carrying every one of `labels` (a matchLabels selector)."""
        if not labels:
            return self.items(namespace)
        with self._lock:
            sets = [self._labels.get((namespace, k, v), set()) for k, v in labels.items()]
            keys = set.intersection(*sets) if sets else set()
            return [self._items[key] for key in keys]

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop watching; closes the open watch connection so the thread ends promptly."""
        self._stop.set()
        current = self._watch
        if current is not None:
            current.stop()  # type: ignore[no-untyped-call]
            response = getattr(current, "_resp", None)
            if response is not None:
                try:
                    response.shutdown()
                except Exception:  # a response already closed by its own thread
                    log.debug(
                        "informer %s: shutting the watch response down failed", self.name, exc_info=True
                    )
        if self._thread is not None:
            self._thread.join(timeout_s)

    def alive(self) -> bool:
        """True while the watch thread runs (it never ends on its own before `stop()`)."""
        return self._thread is not None and self._thread.is_alive()

    def wait_synced(self, timeout_s: float) -> bool:
        return self.synced.wait(timeout_s)

    # --- writes from the controller's own calls --------------------------------------------------------

    def apply(self, obj: Obj, *, deleted: bool = False) -> None:
        """Put an object a write returned into the cache, unless the cache already holds a newer one."""
        meta = obj.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            current = self._items.get(key)
            if current is not None and _rv(current) > _rv(obj):
                return
            if deleted:
                self._remove(key)
            else:
                self._put(key, obj)

    # --- the thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._list()
                failures = 0
                while not self._stop.is_set():
                    self._watch_once()
            except _Expired:
                log.info("informer %s: watch history expired; listing again", self.name)
            except (errors.ClusterError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    break
                failures += 1
                delay = RELIST_BACKOFF_S[min(failures, len(RELIST_BACKOFF_S)) - 1]
                log.warning("informer %s: %s; listing again in %.1f s", self.name, exc, delay)
                self._stop.wait(delay)
            except Exception as exc:  # urllib3 protocol errors when the connection is cut on stop
                if self._stop.is_set():
                    break
                failures += 1
                log.warning("informer %s: watch failed: %r; listing again", self.name, exc)
                self._stop.wait(RELIST_BACKOFF_S[min(failures, len(RELIST_BACKOFF_S)) - 1])

    def _list(self) -> None:
        """List every page (`limit`/`continue`, `LIST_PAGE_SIZE` at a time), then replace the store.

        An expired continue token (410) fails the list, which is retried from the start after a backoff.
        """
        items: dict[Key, Obj] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": self.label_selector, "limit": LIST_PAGE_SIZE}
            if token:
                kwargs["_continue"] = token
            body = api.call(self.list_fn, *self.args, **kwargs)
            for obj in body.get("items", []):
                meta = obj["metadata"]
                items[(meta.get("namespace", ""), meta["name"])] = obj
            token = body.get("metadata", {}).get("continue") or None
            if token is None:
                break
        with self._lock:
            gone = [key for key in self._items if key not in items]
            self._items.clear()
            self._labels.clear()
            for key, obj in items.items():
                self._put(key, obj)
            self.resource_version = body.get("metadata", {}).get("resourceVersion", "")
        self.synced.set()
        if self.on_change is not None:
            for key in gone:
                self.on_change("DELETED", {"metadata": {"namespace": key[0], "name": key[1]}})
            for obj in items.values():
                self.on_change("SYNC", obj)

    def _watch_once(self) -> None:
        w = watch.Watch()  # type: ignore[no-untyped-call]
        self._watch = w
        try:
            for event in self._events(w):
                if self._stop.is_set():
                    break
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired()
                    raise errors.ClusterError(f"watch error: {obj.get('message')}")
                rv = obj.get("metadata", {}).get("resourceVersion")
                if rv:
                    self.resource_version = rv
                if kind == "BOOKMARK":
                    continue
                self.apply(obj, deleted=kind == "DELETED")
                if self.on_change is not None:
                    self.on_change(kind, obj)
        finally:
            self._watch = None

    def _events(self, w: watch.Watch) -> Iterator[Obj]:
        try:
            yield from w.stream(  # type: ignore[no-untyped-call]
                self.list_fn,
                *self.args,
                label_selector=self.label_selector,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_WINDOW_S,
                deserialize=False,
                _request_timeout=(api.REQUEST_TIMEOUT_S[0], WATCH_WINDOW_S + 30),
            )
        except kube_exceptions.ApiException as exc:
            if exc.status == 410:
                raise _Expired() from exc
            raise api.translate(exc) from exc
        except json.JSONDecodeError as exc:
            raise errors.ClusterError(f"undecodable watch event: {exc}") from exc

    def _put(self, key: Key, obj: Obj) -> None:
        self._remove(key)
        self._items[key] = obj
        for k, v in (obj.get("metadata", {}).get("labels") or {}).items():
            self._labels.setdefault((key[0], k, v), set()).add(key)

    def _remove(self, key: Key) -> None:
        old = self._items.pop(key, None)
        if old is None:
            return
        for k, v in (old.get("metadata", {}).get("labels") or {}).items():
            self._labels.get((key[0], k, v), set()).discard(key)


class _Expired(Exception):
    """The resourceVersion to resume from is older than the server's history (410): list again."""


def _rv(obj: Obj) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0
