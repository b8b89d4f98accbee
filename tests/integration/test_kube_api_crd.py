"""The in-test API server runs kube-apiserver's CEL cost check when a CRD is created (simplified form).

A CRD whose rule is over budget is refused with 422 and its kind is not served; an accepted one is served at
once, and objects of its kind are validated against its schema.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubernetes import client

from controller import crd, errors
from controller.kube import api as kube_api_mod
from tests.fakes import crd_schema
from tests.fakes.kube_api import FakeKubeApi, scaling_policy

QUADRATIC_RULE = "!has(self.gpuTypes) || self.gpuTypes.all(a, self.gpuTypes.exists_one(b, b.name == a.name))"


def widget_crd(*, rule: str | None) -> dict[str, Any]:
    """The ScalingPolicy CRD renamed to Widget, optionally with `rule` on an unbounded gpuTypes."""
    definition = crd.definition()
    definition["metadata"]["name"] = "widgets.example.dev"
    definition["spec"]["group"] = "example.dev"
    definition["spec"]["names"].update(
        plural="widgets", singular="widget", kind="Widget", listKind="WidgetList", shortNames=[]
    )
    capacity = crd_schema.crd_schema(definition)["properties"]["spec"]["properties"]["capacity"]
    if rule is not None:
        capacity["x-kubernetes-validations"] = [{"rule": rule, "message": "names must be unique"}]
        del capacity["properties"]["gpuTypes"]["maxItems"]
    return definition


async def test_over_budget_crd_is_refused_and_an_accepted_one_is_served() -> None:
    async with FakeKubeApi() as api:
        api_client = kube_api_mod.client_for(api.url)
        extensions = client.ApiextensionsV1Api(api_client)
        with pytest.raises(errors.ClusterError, match=r"422.*estimated rule cost exceeds budget"):
            await asyncio.to_thread(
                kube_api_mod.call,
                extensions.create_custom_resource_definition,
                widget_crd(rule=QUADRATIC_RULE),
            )
        with pytest.raises(errors.NotFound):
            await asyncio.to_thread(
                kube_api_mod.call,
                client.CustomObjectsApi(api_client).list_namespaced_custom_object,
                "example.dev",
                "v1alpha1",
                "llm",
                "widgets",
            )
        await asyncio.to_thread(
            kube_api_mod.call, extensions.create_custom_resource_definition, widget_crd(rule=None)
        )
        widget = scaling_policy("w", "llm")
        widget.update(apiVersion="example.dev/v1alpha1", kind="Widget")
        widget["spec"]["capacity"]["gpuTypes"] = [
            {"name": "H100", "streamsPerReplica": 32},
            {"name": "H100", "streamsPerReplica": 16},
        ]
        objects = client.CustomObjectsApi(api_client)
        with pytest.raises(errors.ClusterError, match=r"422.*Duplicate value"):
            await asyncio.to_thread(
                kube_api_mod.call,
                objects.create_namespaced_custom_object,
                "example.dev",
                "v1alpha1",
                "llm",
                "widgets",
                widget,
            )
        widget["spec"]["capacity"]["gpuTypes"].pop()
        await asyncio.to_thread(
            kube_api_mod.call,
            objects.create_namespaced_custom_object,
            "example.dev",
            "v1alpha1",
            "llm",
            "widgets",
            widget,
        )
        assert api.get("example.dev", "widgets", "llm", "w") is not None
        api_client.close()
