"""Informers list in pages (`limit`/`continue`) and recover from an expired continue token."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes import client

from controller.kube import api as kube_api_mod
from controller.kube import informer
from tests.fakes.kube_api import FakeKubeApi, eventually

NS = "llm"


def pod(name: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "w"}},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }


async def test_a_large_list_arrives_in_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(informer, "LIST_PAGE_SIZE", 10)
    async with FakeKubeApi(bookmark_interval_s=0.1) as api:
        for i in range(25):
            api.put(pod(f"p{i:02d}"))
        api_client = kube_api_mod.client_for(api.url)
        pods = informer.Informer(client.CoreV1Api(api_client).list_namespaced_pod, NS, name="pods")
        pods.start()
        try:
            assert await asyncio.to_thread(pods.wait_synced, 10.0)
            assert len(pods.items(NS)) == 25
            assert len(api.calls("list", "pods")) == 3
        finally:
            await asyncio.to_thread(pods.stop)
            api_client.close()


async def test_an_expired_continue_token_restarts_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(informer, "LIST_PAGE_SIZE", 10)
    monkeypatch.setattr(informer, "RELIST_BACKOFF_S", (0.01,))
    async with FakeKubeApi(bookmark_interval_s=0.1) as api:
        for i in range(25):
            api.put(pod(f"p{i:02d}"))
        api.inject_hang("GET", r"/pods$", query_regex="continue=", times=1)
        api_client = kube_api_mod.client_for(api.url)
        pods = informer.Informer(client.CoreV1Api(api_client).list_namespaced_pod, NS, name="pods")
        pods.start()
        try:
            await eventually(lambda: api.hung == 1, "the second page requested")
            api.put(pod("later"))  # meanwhile the store moves on and its history is compacted
            api.compact()
            api.release_hangs()
            assert await asyncio.to_thread(pods.wait_synced, 10.0)
            assert len(pods.items(NS)) == 26
            assert [c.status for c in api.calls("list", "pods")][:2] == [200, 410]
        finally:
            await asyncio.to_thread(pods.stop)
            api_client.close()
