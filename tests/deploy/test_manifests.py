"""The kustomize manifests render, validate and keep their promises (security, RBAC, network, CLI flags).

Rendering: `kubectl kustomize` when kubectl is on PATH with an embedded kustomize of v4.1 or later (the
development host's /usr/bin/kubectl 1.32 embeds v5.5). Debian bookworm only packages kubectl 1.20
(`kubernetes-client`, kustomize v2.0.3, which predates `labels` and `patches`), so it is not installed by
scripts/setup, and CI machines without a modern kubectl use `render_python` below instead: a small equivalent covering exactly the kustomization fields these manifests use
(resources, namespace, labels, images, JSON 6902 patches) and refusing any other field. When kubectl is
present, a test renders every kustomization both ways and requires the same objects, so the fallback
cannot drift silently. `RENDERER` says which one ran (printed in the pytest header line of each test id).

Validation: built-in kinds with `kubernetes-validate` in strict mode (unknown fields fail) for
Kubernetes 1.34; ScalingPolicies with the CRD's own schema (tests/fakes/crd_schema.py: defaults, unknown
fields, OpenAPI keywords, CEL rules) and with `forestall validate`; third-party custom resources
(Karpenter NodePool, CapacityBuffer, ProvisioningRequest, Prometheus Operator monitors) only
structurally: their CRDs are not vendored here, so the checks are the required fields and enums named in
their CRDs plus cross-references (ports and templates that must exist), not a full schema validation.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller import policy
from forestall import cli
from tests.fakes import crd_schema
from tests.fakes.kube_api import schemas

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
CRD_FILE = MANIFESTS / "crd" / "scalingpolicies.forestall.dev.yaml"
KUSTOMIZATIONS = {
    "base": MANIFESTS / "base",
    "karpenter": MANIFESTS / "overlays" / "karpenter",
    "cluster-autoscaler": MANIFESTS / "overlays" / "cluster-autoscaler",
    "dry-run": MANIFESTS / "overlays" / "dry-run",
    "gateway": MANIFESTS / "overlays" / "gateway",
    "monitoring": MANIFESTS / "examples" / "monitoring",
}
INSTALLS = ("base", "karpenter", "cluster-autoscaler", "dry-run", "gateway")
"""The kustomizations that install Forestall itself (examples go on top of one of them)."""
EXAMPLE_FILES = sorted((MANIFESTS / "examples").glob("*.yaml"))
"""Applied with `kubectl apply -f` (plain files, so `forestall validate manifests/examples/*.yaml` works)."""
STANDALONE_EXAMPLES = sorted((MANIFESTS / "examples" / "cluster-autoscaler").glob("*.yaml"))
K8S_VERSION = "1.34.0"
"""A current Kubernetes release whose schemas kubernetes-validate ships (strict variant)."""
MIN_KUSTOMIZE = (4, 1)
"""The embedded kustomize must know `labels` (v4.1) and `patches`; Debian's kubectl 1.20 has v2.0.3."""


def _kustomize_version(kubectl: str) -> tuple[int, int] | None:
    out = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, check=False
    )
    match = re.match(r"v(\d+)\.(\d+)", json.loads(out.stdout or "{}").get("kustomizeVersion", ""))
    return (int(match[1]), int(match[2])) if match else None


def _usable_kubectl() -> str | None:
    """kubectl on PATH whose embedded kustomize renders these manifests, else None (use render_python)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    version = _kustomize_version(kubectl)
    return kubectl if version is not None and version >= MIN_KUSTOMIZE else None


KUBECTL = _usable_kubectl()
RENDERER = "kubectl kustomize" if KUBECTL else "python fallback (render_python)"

Obj = dict[str, Any]
CONTROLLER_LABELS = {"app.kubernetes.io/name": "forestall", "app.kubernetes.io/component": "controller"}
BALANCER_LABELS = {"app.kubernetes.io/name": "forestall", "app.kubernetes.io/component": "balancer"}
NAMESPACE = "forestall-system"
PROXY_PORT, ADMIN_PORT = 8080, 8081


# ---------------------------------------------------------------------------------------------- rendering


def render(path: Path) -> list[Obj]:
    """The objects a kustomization renders to, with kubectl when available, else `render_python`."""
    if KUBECTL:
        return render_kubectl(path)
    return render_python(path)


def render_kubectl(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(_kubectl_kustomize(path)) if doc]


@functools.cache
def _kubectl_kustomize(path: Path) -> str:
    """kubectl's output, once per path per run (the text is cached, so every caller gets fresh objects)."""
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"kubectl kustomize {path} failed: {out.stderr}"
    return out.stdout


_CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "StorageClass",
}
"""Built-in kinds kustomize's namespace transformer leaves alone (every other kind gets the namespace)."""
_SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}


def render_python(path: Path) -> list[Obj]:
    """A kustomize equivalent for the fields these manifests use; any other field is an error.

    Order of operations as in kustomize: load resources (files, or directories rendered recursively),
    then this kustomization's transformers: namespace, labels (metadata only, `includeSelectors: false`),
    images, then patches (JSON 6902 operation lists, selected by target group/version/kind/name).
    """
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(kust) - _SUPPORTED_FIELDS
    if unknown:
        raise ValueError(
            f"{path}/kustomization.yaml uses {sorted(unknown)}, which render_python does not support"
        )
    objs: list[Obj] = []
    for res in kust.get("resources", []):
        target = (path / res).resolve()
        if target.is_dir():
            objs.extend(render_python(target))
        else:
            if not target.is_relative_to(path.resolve()):
                raise ValueError(f"{path}: {res} is outside the kustomization root (kustomize refuses it)")
            objs.extend(doc for doc in yaml.safe_load_all(target.read_text()) if doc)
    if "namespace" in kust:
        for obj in objs:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kust["namespace"]
            if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                for subject in obj.get("subjects", []):
                    if subject.get("kind") == "ServiceAccount":
                        subject["namespace"] = kust["namespace"]
    for entry in kust.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise ValueError(f"{path}: render_python supports metadata-only labels")
        for obj in objs:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in kust.get("images", []):
        for container in (c for obj in objs for c in _containers(obj)):
            name, _, _tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for patch in kust.get("patches", []):
        ops = yaml.safe_load((path / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise ValueError(f"{path}/{patch['path']}: render_python supports JSON 6902 patches only")
        hits = [obj for obj in objs if _matches(obj, patch["target"])]
        assert hits, f"{path}: patch {patch['path']} matches no object"
        for obj in hits:
            for op in ops:
                _json_patch(obj, op)
    return objs


def _matches(obj: Obj, target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return all(
        (
            target.get("kind", obj["kind"]) == obj["kind"],
            target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"],
            target.get("group", group) == group,
            target.get("version", version) == version,
        )
    )


def _json_patch(obj: Obj, op: dict[str, Any]) -> None:
    """Apply one RFC 6902 `add`, `replace` or `remove` operation in place."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    elif op["op"] == "replace":
        node[int(last) if isinstance(node, list) else last] = op["value"]
    elif op["op"] == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), op["value"])
    elif op["op"] == "add":
        node[last] = op["value"]
    else:
        raise ValueError(f"render_python supports add/replace/remove, got {op['op']!r}")


def _key(obj: Obj) -> tuple[str, str, str, str]:
    return (obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def _load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Every kustomization rendered, plus "examples": the example files and the monitoring kustomization."""
    out = {name: render(path) for name, path in KUSTOMIZATIONS.items()}
    out["examples"] = [doc for path in EXAMPLE_FILES for doc in _load(path)] + out["monitoring"]
    return out


def _all_objects(rendered: dict[str, list[Obj]]) -> Iterator[tuple[str, Obj]]:
    for name, objs in rendered.items():
        if name == "monitoring":
            continue  # also inside "examples"
        for obj in objs:
            yield name, obj
    for path in STANDALONE_EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def _find(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# ----------------------------------------------------------------------------------------- the renders


def test_renderer_choice_follows_the_embedded_kustomize_version() -> None:
    """kubectl renders when its kustomize is new enough; an old or missing one means the Python fallback."""
    print(f"manifests rendered with: {RENDERER}")  # shown with -rA
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        assert KUBECTL is None
        return
    version = _kustomize_version(kubectl)
    assert (KUBECTL is not None) == (version is not None and version >= MIN_KUSTOMIZE), version


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_kustomization_renders_unique_objects(rendered: dict[str, list[Obj]], name: str) -> None:
    keys = [_key(o) for o in rendered[name]]
    assert keys, f"{name} rendered nothing"
    assert len(keys) == len(set(keys)), f"{name} renders duplicates: {keys}"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH: only the python renderer is available")
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_python_fallback_renders_what_kubectl_renders(name: str) -> None:
    by_kubectl = {_key(o): o for o in render_kubectl(KUSTOMIZATIONS[name])}
    by_python = {_key(o): o for o in render_python(KUSTOMIZATIONS[name])}
    assert sorted(by_python) == sorted(by_kubectl)
    for key, obj in by_kubectl.items():
        assert by_python[key] == obj, f"{key} differs between kubectl and render_python"


def test_python_fallback_refuses_fields_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonAnnotations: {a: b}\n")
    with pytest.raises(ValueError, match="commonAnnotations"):
        render_python(tmp_path)


def test_crd_is_the_generated_file_not_a_copy(rendered: dict[str, list[Obj]]) -> None:
    """The base pulls in manifests/crd/ (regenerated by `forestall crd`), so there is one source."""
    generated = yaml.safe_load(CRD_FILE.read_text())
    for name in INSTALLS:
        crd = _find(rendered[name], "CustomResourceDefinition", "scalingpolicies.forestall.dev")
        assert crd["spec"] == generated["spec"]
    copies = [p for p in MANIFESTS.rglob("*.yaml") if "CustomResourceDefinition" in p.read_text()]
    assert copies == [CRD_FILE]


# ---------------------------------------------------------------------------------------- validation

_BUILTIN_GROUPS = {
    "",
    "apps",
    "policy",
    "autoscaling",
    "rbac.authorization.k8s.io",
    "networking.k8s.io",
    "scheduling.k8s.io",
    "apiextensions.k8s.io",
    "discovery.k8s.io",
    "coordination.k8s.io",
}


def _group(obj: Obj) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def test_every_builtin_object_validates_strictly(rendered: dict[str, list[Obj]]) -> None:
    problems = []
    count = 0
    for where, obj in _all_objects(rendered):
        if _group(obj) not in _BUILTIN_GROUPS:
            continue
        count += 1
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {_key(obj)}: {str(exc).splitlines()[0]}")
    assert not problems, "\n".join(problems)
    assert count >= 20


def test_strict_validation_catches_a_misspelt_field(rendered: dict[str, list[Obj]]) -> None:
    """The validator really is strict: one typo in a container fails."""
    deployment = copy.deepcopy(_find(rendered["base"], "Deployment", "forestall-controller"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_scaling_policies_pass_the_crd_schema_and_forestall_validate(
    rendered: dict[str, list[Obj]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = crd_schema.crd_schema(yaml.safe_load(CRD_FILE.read_text()))
    policies = [(w, o) for w, o in _all_objects(rendered) if o["kind"] == policy.KIND]
    assert len(policies) >= 2
    for index, (where, obj) in enumerate(policies):
        assert crd_schema.validate(schema, obj) == [], where
        path = tmp_path / f"policy-{index}.yaml"
        path.write_text(yaml.safe_dump(obj))
        assert cli.main(["validate", str(path)]) == 0, capsys.readouterr().out


def _requires(obj: Obj, *paths: str) -> list[str]:
    missing = []
    for dotted in paths:
        node: Any = obj
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(f"{obj['kind']}/{obj['metadata']['name']}: missing {dotted}")
                break
            node = node[part]
    return missing


_DURATION = re.compile(r"^(([0-9]+(s|m|h))+|Never)$")


def _check_nodepool(obj: Obj, _objs: list[Obj]) -> list[str]:
    out = _requires(
        obj,
        "spec.template.spec.nodeClassRef.group",
        "spec.template.spec.nodeClassRef.kind",
        "spec.template.spec.nodeClassRef.name",
        "spec.template.spec.requirements",
        "spec.disruption.consolidateAfter",
    )
    if out:
        return out
    spec = obj["spec"]
    for req in spec["template"]["spec"]["requirements"]:
        if req["operator"] not in ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"):
            out.append(f"requirement {req['key']}: bad operator {req['operator']}")
        if req["operator"] == "In" and not req.get("values"):
            out.append(f"requirement {req['key']}: In needs values")
    if spec["disruption"].get("consolidationPolicy") not in ("WhenEmpty", "WhenEmptyOrUnderutilized"):
        out.append("disruption.consolidationPolicy must be WhenEmpty or WhenEmptyOrUnderutilized")
    for field in ("consolidateAfter",):
        if not _DURATION.match(spec["disruption"][field]):
            out.append(f"disruption.{field} is not a duration")
    for budget in spec["disruption"].get("budgets", []):
        if not re.match(r"^((100|[0-9]{1,2})%|[0-9]+)$", budget["nodes"]):
            out.append(f"budget nodes {budget['nodes']!r} is neither a count nor a percentage")
    for field in ("expireAfter", "terminationGracePeriod"):
        value = spec["template"]["spec"].get(field)
        if value is not None and not _DURATION.match(value):
            out.append(f"template.spec.{field} {value!r} is not a duration")
    if "namespace" in obj["metadata"]:
        out.append("NodePool is cluster-scoped: no metadata.namespace")
    return out


def _check_capacity_buffer(obj: Obj, objs: list[Obj]) -> list[str]:
    spec = obj.get("spec", {})
    refs = [r for r in ("podTemplateRef", "scalableRef") if r in spec]
    out = (
        []
        if len(refs) == 1
        else [f"CapacityBuffer needs exactly one of podTemplateRef/scalableRef, got {refs}"]
    )
    if "scalableRef" in spec:
        out += _requires(obj, "spec.scalableRef.kind", "spec.scalableRef.name")
    if "podTemplateRef" in spec:
        templates = {
            (o["metadata"].get("namespace"), o["metadata"]["name"])
            for o in objs
            if o["kind"] == "PodTemplate"
        }
        if (obj["metadata"].get("namespace"), spec["podTemplateRef"].get("name")) not in templates:
            out.append(f"podTemplateRef {spec['podTemplateRef']} names no PodTemplate in the same namespace")
    if not isinstance(spec.get("replicas", 0), int) or spec.get("replicas", 0) < 0:
        out.append("spec.replicas must be an integer >= 0")
    if obj["apiVersion"] not in ("autoscaling.x-k8s.io/v1beta1", "autoscaling.x-k8s.io/v1alpha1"):
        out.append(f"unknown CapacityBuffer version {obj['apiVersion']}")
    return out


def _check_provisioning_request(obj: Obj, objs: list[Obj]) -> list[str]:
    out = _requires(obj, "spec.provisioningClassName", "spec.podSets")
    if out:
        return out
    if not 1 <= len(obj["spec"]["podSets"]) <= 32:
        out.append("spec.podSets must hold 1 to 32 entries")
    templates = {
        (o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs if o["kind"] == "PodTemplate"
    }
    for pod_set in obj["spec"]["podSets"]:
        if pod_set.get("count", 0) < 1:
            out.append("podSets[].count must be >= 1")
        ref = (obj["metadata"].get("namespace"), pod_set["podTemplateRef"]["name"])
        if ref not in templates:
            out.append(f"podTemplateRef {ref} names no PodTemplate in the same namespace")
    if any(len(str(v)) > 255 for v in obj["spec"].get("parameters", {}).values()):
        out.append("parameters are limited to 255 characters")
    return out


def _pod_templates_selected(objs: list[Obj], namespace: str, selector: dict[str, str]) -> list[Obj]:
    return [
        o["spec"]["template"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
        and o["metadata"].get("namespace") == namespace
        and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
    ]


def _check_pod_monitor(obj: Obj, objs: list[Obj]) -> list[str]:
    out = _requires(obj, "spec.selector.matchLabels", "spec.podMetricsEndpoints")
    if out:
        return out
    pods = _pod_templates_selected(objs, obj["metadata"]["namespace"], obj["spec"]["selector"]["matchLabels"])
    if not pods:
        return [f"PodMonitor {obj['metadata']['name']} selects no pod template"]
    names = {p["name"] for pod in pods for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    for endpoint in obj["spec"]["podMetricsEndpoints"]:
        if endpoint.get("port") not in names:
            out.append(f"PodMonitor port {endpoint.get('port')!r} is not a container port name ({names})")
    return out


def _check_service_monitor(obj: Obj, objs: list[Obj]) -> list[str]:
    out = _requires(obj, "spec.selector.matchLabels", "spec.endpoints")
    if out:
        return out
    services = [
        o
        for o in objs
        if o["kind"] == "Service"
        and o["metadata"].get("namespace") == obj["metadata"]["namespace"]
        and obj["spec"]["selector"]["matchLabels"].items() <= o["metadata"].get("labels", {}).items()
    ]
    if not services:
        return [f"ServiceMonitor {obj['metadata']['name']} selects no Service"]
    names = {p["name"] for s in services for p in s["spec"]["ports"]}
    for endpoint in obj["spec"]["endpoints"]:
        if endpoint.get("port") not in names:
            out.append(f"ServiceMonitor port {endpoint.get('port')!r} is not a Service port name ({names})")
    return out


def _check_inference_pool(obj: Obj, objs: list[Obj]) -> list[str]:
    """Valid against GIE's released CRD; its selector picks a pod template; the picker it names exists."""
    problems = crd_schema.validate(schemas.inferencepool_schema(), obj)
    namespace = obj["metadata"]["namespace"]
    if not _pod_templates_selected(objs, namespace, obj["spec"]["selector"]["matchLabels"]):
        problems.append("its selector matches no pod template")
    ref = obj["spec"]["endpointPickerRef"]
    service = next(
        (
            o
            for o in objs
            if o["kind"] == "Service"
            and o["metadata"]["name"] == ref["name"]
            and o["metadata"].get("namespace") == namespace
        ),
        None,
    )
    if service is None or ref["port"]["number"] not in [p["port"] for p in service["spec"]["ports"]]:
        problems.append(f"endpointPickerRef {ref} names no Service port in {namespace}")
    return problems


THIRD_PARTY_CHECKS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): _check_inference_pool,
    ("karpenter.sh/v1", "NodePool"): _check_nodepool,
    ("autoscaling.x-k8s.io/v1beta1", "CapacityBuffer"): _check_capacity_buffer,
    ("autoscaling.x-k8s.io/v1", "ProvisioningRequest"): _check_provisioning_request,
    ("monitoring.coreos.com/v1", "PodMonitor"): _check_pod_monitor,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _check_service_monitor,
}


def test_third_party_objects_are_structurally_sound(rendered: dict[str, list[Obj]]) -> None:
    """Every object that is neither built in nor ours has a known apiVersion/kind and passes its check."""
    install = rendered["base"] + rendered["examples"] + rendered["gateway"]
    seen = set()
    problems = []
    for where, obj in _all_objects(rendered):
        if _group(obj) in _BUILTIN_GROUPS or obj["kind"] == policy.KIND:
            continue
        check = THIRD_PARTY_CHECKS.get((obj["apiVersion"], obj["kind"]))
        if check is None:
            problems.append(f"{where}: no check for {obj['apiVersion']} {obj['kind']}")
            continue
        seen.add(obj["kind"])
        context = install
        if where.endswith(".yaml"):
            context = install + [
                d
                for d in yaml.safe_load_all(
                    (MANIFESTS / "examples" / "cluster-autoscaler" / where).read_text()
                )
                if d
            ]
        problems += [f"{where}: {p}" for p in check(obj, context)]
    assert not problems, "\n".join(problems)
    assert seen == {
        "NodePool",
        "CapacityBuffer",
        "ProvisioningRequest",
        "PodMonitor",
        "ServiceMonitor",
        "InferencePool",
    }


def test_controller_scrape_keeps_the_policy_namespace_label(rendered: dict[str, list[Obj]]) -> None:
    """The controller exports `namespace` (the policy's); the scrape must not overwrite it with its own."""
    monitor = _find(rendered["examples"], "ServiceMonitor", "forestall-controller")
    assert all(endpoint.get("honorLabels") is True for endpoint in monitor["spec"]["endpoints"])


def test_structural_checks_catch_broken_objects(rendered: dict[str, list[Obj]]) -> None:
    nodepool = copy.deepcopy(_find(rendered["karpenter"], "NodePool", "gpu-inference"))
    del nodepool["spec"]["template"]["spec"]["nodeClassRef"]["group"]
    assert _check_nodepool(nodepool, [])
    monitor = copy.deepcopy(_find(rendered["examples"], "PodMonitor", "forestall-balancer"))
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = "metrics"
    assert _check_pod_monitor(monitor, rendered["base"])
    buffer = next(
        d
        for d in yaml.safe_load_all(
            (MANIFESTS / "examples" / "cluster-autoscaler" / "capacitybuffer.yaml").read_text()
        )
        if d["kind"] == "CapacityBuffer"
    )
    assert _check_capacity_buffer(buffer, []), "a podTemplateRef to nothing is caught"


# -------------------------------------------------------------------------------------- pod security


def _pod_specs(obj: Obj) -> list[Obj]:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "PodTemplate":
        return [obj["template"]["spec"]]
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    return []


def _containers(obj: Obj) -> list[Obj]:
    return [c for spec in _pod_specs(obj) for c in spec.get("initContainers", []) + spec["containers"]]


def pod_security_problems(obj: Obj) -> list[str]:
    """What the restricted Pod Security Standard plus a read-only root filesystem forbid, per pod spec."""
    out = []
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    for spec in _pod_specs(obj):
        pod_ctx = spec.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                out.append(f"{name}: {flag}")
        out += [f"{name}: hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
        for c in spec.get("initContainers", []) + spec["containers"]:
            ctx = c.get("securityContext", {})
            where = f"{name} container {c['name']}"
            if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
                out.append(f"{where}: runAsNonRoot is not true")
            if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
                out.append(f"{where}: runs as UID 0")
            if ctx.get("allowPrivilegeEscalation") is not False:
                out.append(f"{where}: allowPrivilegeEscalation is not false")
            if ctx.get("readOnlyRootFilesystem") is not True:
                out.append(f"{where}: readOnlyRootFilesystem is not true")
            if ctx.get("privileged"):
                out.append(f"{where}: privileged")
            if ctx.get("capabilities", {}).get("drop") != ["ALL"] or ctx.get("capabilities", {}).get("add"):
                out.append(f"{where}: capabilities must drop ALL and add none")
            seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                out.append(f"{where}: seccompProfile is not RuntimeDefault")
    return out


def test_every_pod_template_is_restricted(rendered: dict[str, list[Obj]]) -> None:
    checked = 0
    problems = []
    for where, obj in _all_objects(rendered):
        if _pod_specs(obj):
            checked += 1
            problems += [f"{where}: {p}" for p in pod_security_problems(obj)]
    assert not problems, "\n".join(problems)
    assert checked >= 4  # controller, balancer, vLLM, the ProvisioningRequest's PodTemplate


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("allowPrivilegeEscalation", True),
        ("readOnlyRootFilesystem", False),
        ("capabilities", {"drop": ["NET_RAW"]}),
        ("seccompProfile", {"type": "Unconfined"}),
        ("runAsNonRoot", False),
    ],
)
def test_pod_security_check_catches_each_weakening(
    rendered: dict[str, list[Obj]], path: str, value: Any
) -> None:
    deployment = copy.deepcopy(_find(rendered["base"], "Deployment", "forestall-balancer"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"][path] = value
    assert pod_security_problems(deployment)


def test_forestall_namespace_enforces_restricted(rendered: dict[str, list[Obj]]) -> None:
    ns = _find(rendered["base"], "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# ---------------------------------------------------------------------------------------- networking


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions with In/NotIn/Exists/DoesNotExist)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def ingress_allowed(
    objs: list[Obj],
    *,
    dest_namespace: str,
    dest_labels: dict[str, str],
    port: int,
    src_namespace: str,
    src_labels: dict[str, str],
    namespace_labels: dict[str, dict[str, str]],
) -> bool:
    """Whether NetworkPolicy semantics let a pod reach `port` of another (union of all selecting policies)."""
    policies = [
        o
        for o in objs
        if o["kind"] == "NetworkPolicy"
        and o["metadata"]["namespace"] == dest_namespace
        and "Ingress" in o["spec"].get("policyTypes", ["Ingress"])
        and _selects(o["spec"]["podSelector"], dest_labels)
    ]
    if not policies:
        return True  # no policy selects the pod: everything is allowed
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("port") in (port, None) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = (
                    src_namespace == dest_namespace
                    if ns_sel is None
                    else _selects(ns_sel, namespace_labels.get(src_namespace, {}))
                )
                if ns_ok and (pod_sel is None or _selects(pod_sel, src_labels)):
                    return True
    return False


def _reach(objs: list[Obj], port: int, src_namespace: str, src_labels: dict[str, str]) -> bool:
    namespaces = {
        o["metadata"]["name"]: {
            **o["metadata"].get("labels", {}),
            "kubernetes.io/metadata.name": o["metadata"]["name"],
        }
        for o in objs
        if o["kind"] == "Namespace"
    }
    namespaces.setdefault("monitoring", {"kubernetes.io/metadata.name": "monitoring"})
    namespaces.setdefault("llm", {"kubernetes.io/metadata.name": "llm"})
    return ingress_allowed(
        objs,
        dest_namespace=NAMESPACE,
        dest_labels=_find(objs, "Deployment", "forestall-balancer")["spec"]["template"]["metadata"]["labels"],
        port=port,
        src_namespace=src_namespace,
        src_labels=src_labels,
        namespace_labels=namespaces,
    )


@pytest.mark.parametrize("name", INSTALLS)
def test_balancer_admin_port_is_reachable_only_from_the_controller(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    controller = _find(objs, "Deployment", "forestall-controller")["spec"]["template"]["metadata"]["labels"]
    balancer = _find(objs, "Deployment", "forestall-balancer")["spec"]["template"]["metadata"]["labels"]
    assert _reach(objs, ADMIN_PORT, NAMESPACE, controller)
    assert not _reach(objs, ADMIN_PORT, NAMESPACE, balancer)
    assert not _reach(objs, ADMIN_PORT, NAMESPACE, {"app": "anything-else"})
    assert not _reach(objs, ADMIN_PORT, "llm", controller), "controller labels in another namespace"
    assert not _reach(objs, ADMIN_PORT, "monitoring", {"app.kubernetes.io/name": "prometheus"})
    # The proxy port stays open to clients anywhere in the cluster.
    assert _reach(objs, PROXY_PORT, "llm", {"app": "client"})
    assert _reach(objs, PROXY_PORT, NAMESPACE, balancer)


def test_monitoring_example_opens_the_admin_port_to_prometheus_only(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["base"] + rendered["examples"]
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert _reach(objs, ADMIN_PORT, "monitoring", prometheus)
    assert not _reach(objs, ADMIN_PORT, "llm", prometheus)
    assert not _reach(objs, ADMIN_PORT, "monitoring", {"app.kubernetes.io/name": "grafana"})


def test_service_ports_and_names(rendered: dict[str, list[Obj]]) -> None:
    service = _find(rendered["base"], "Service", "forestall-balancer")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (PROXY_PORT, "http"), "admin": (ADMIN_PORT, "admin")}
    container = _find(rendered["base"], "Deployment", "forestall-balancer")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": PROXY_PORT,
        "admin": ADMIN_PORT,
    }
    # The example policy reads /signals on the port the Service exposes as admin.
    example = yaml.safe_load((MANIFESTS / "examples" / "scalingpolicy-vllm.yaml").read_text())
    assert example["spec"]["demand"]["balancer"]["port"] == ADMIN_PORT
    assert example["spec"]["demand"]["balancer"]["service"] == service["metadata"]["name"]
    assert example["spec"]["demand"]["balancer"]["namespace"] == NAMESPACE


# ------------------------------------------------------------------------------------------ workloads


def test_controller_runs_two_replicas_with_leader_election_probes_and_resources(
    rendered: dict[str, list[Obj]],
) -> None:
    for name in INSTALLS:
        deployment = _find(rendered[name], "Deployment", "forestall-controller")
        assert deployment["spec"]["replicas"] == 2
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][0] == "controller"
        assert "--leader-election" in container["args"]
        assert "--leader-election-namespace=$(POD_NAMESPACE)" in container["args"]
        env = {
            e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]
        }
        assert env["POD_NAME"] == "metadata.name", "the Lease identity is the pod name"
        assert env["POD_NAMESPACE"] == "metadata.namespace"
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] in {p["name"] for p in container["ports"]}
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert "memory" in container["resources"]["limits"]


def test_balancer_has_hpa_pdb_and_probes(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["base"]
    deployment = _find(objs, "Deployment", "forestall-balancer")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = _find(objs, "HorizontalPodAutoscaler", "forestall-balancer")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "forestall-balancer",
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert "cpu" in deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    for pdb_name in ("forestall-balancer", "forestall-controller"):
        pdb = _find(objs, "PodDisruptionBudget", pdb_name)
        target = _find(objs, "Deployment", pdb_name)["spec"]["template"]["metadata"]["labels"]
        assert _selects(pdb["spec"]["selector"], target)
    assert not _selects(
        _find(objs, "PodDisruptionBudget", "forestall-controller")["spec"]["selector"], labels
    )


def test_placeholder_priority_class_matches_the_policy_default(rendered: dict[str, list[Obj]]) -> None:
    default_name = policy.PlaceholderProvisioner().priority_class_name
    priority = _find(rendered["base"], "PriorityClass", default_name)
    assert priority["value"] < 0
    assert priority["preemptionPolicy"] == "Never"
    assert priority.get("globalDefault", False) is False


def test_karpenter_nodepool_only_consolidates_empty_gpu_nodes(rendered: dict[str, list[Obj]]) -> None:
    nodepool = _find(rendered["karpenter"], "NodePool", "gpu-inference")
    assert nodepool["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty"
    assert any(t["key"] == "nvidia.com/gpu" for t in nodepool["spec"]["template"]["spec"]["taints"])
    assert "nvidia.com/gpu" in nodepool["spec"]["limits"]
    # The example workload tolerates the pool's taint, so it can land there.
    vllm = _find(rendered["examples"], "Deployment", "vllm-llama-8b")
    assert any(t["key"] == "nvidia.com/gpu" for t in vllm["spec"]["template"]["spec"]["tolerations"])


# ------------------------------------------------------------------------------------------------ RBAC

Grant = tuple[str, str, str]
"""(apiGroup, resource[/subresource], verb), the shape tests/fakes/kube_api.FakeKubeApi.rbac_rules() records."""


def rbac_grants(objs: list[Obj], service_account: str, namespace: str = NAMESPACE) -> dict[str, set[Grant]]:
    """What a ServiceAccount may do: cluster-wide grants under "*", namespaced ones under their namespace.

    A later test compares these with the calls the in-test API server recorded (`rbac_rules()`).
    """
    roles = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objs}
    out: dict[str, set[Grant]] = {}
    for binding in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
        if subject not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        role_ns = "" if ref["kind"] == "ClusterRole" else binding["metadata"]["namespace"]
        role = roles[(ref["kind"], role_ns, ref["name"])]
        scope = "*" if binding["kind"] == "ClusterRoleBinding" else binding["metadata"]["namespace"]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.setdefault(scope, set()).add((group, resource, verb))
    return out


def _write(grants: set[Grant]) -> set[Grant]:
    return {g for g in grants if g[2] not in ("get", "list", "watch")}


def test_no_wildcards_secrets_or_escalation_anywhere(rendered: dict[str, list[Obj]]) -> None:
    for name in INSTALLS:
        for role in (o for o in rendered[name] if o["kind"] in ("Role", "ClusterRole")):
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], f"{name}: {role['metadata']['name']} uses * in {field}"
                assert "secrets" not in rule["resources"]
                assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])


def test_controller_grants_are_exactly_what_it_uses(rendered: dict[str, list[Obj]]) -> None:
    """The writes match the calls in controller/kube/ (scale: read then replace; status: merge patch)."""
    grants = rbac_grants(rendered["base"], "forestall-controller")
    assert _write(grants["*"]) == {
        ("forestall.dev", "scalingpolicies", "patch"),  # the finalizer only
        ("forestall.dev", "scalingpolicies/status", "patch"),
        ("apps", "deployments/scale", "update"),
        ("apps", "statefulsets/scale", "update"),
        ("events.k8s.io", "events", "create"),
    }
    # pod writes only where models run: a RoleBinding per model namespace, never cluster-wide
    per_namespace = rbac_grants(rendered["base"] + rendered["examples"], "forestall-controller")
    assert _write(per_namespace["llm"]) == {("", "pods", v) for v in ("patch", "create", "delete")}
    assert not any(v == "get" and r in ("pods", "nodes", "deployments") for _, r, v in grants["*"]), (
        "caches list"
    )
    watched = {(g, r) for g, r, v in grants["*"] if v == "watch"}
    assert watched == {
        ("forestall.dev", "scalingpolicies"),
        ("apps", "deployments"),
        ("apps", "statefulsets"),
        ("", "pods"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("autoscaling", "horizontalpodautoscalers"),  # a target an HPA or KEDA scales is left alone
    }
    assert ("scheduling.k8s.io", "priorityclasses", "get") in grants["*"]
    # Leader election: Leases in its own namespace only, never cluster-wide.
    assert grants[NAMESPACE] == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    assert not any(g[1] == "leases" for g in grants["*"])


def test_overlays_add_only_their_node_autoscaler_apis(rendered: dict[str, list[Obj]]) -> None:
    base = rbac_grants(rendered["base"], "forestall-controller")
    assert rbac_grants(rendered["karpenter"], "forestall-controller") == base, "Karpenter needs no API access"
    added = rbac_grants(rendered["cluster-autoscaler"], "forestall-controller")["*"] - base["*"]
    assert added == {
        ("autoscaling.x-k8s.io", "capacitybuffers", "get"),
        ("autoscaling.x-k8s.io", "capacitybuffers", "list"),
        ("autoscaling.x-k8s.io", "capacitybuffers", "create"),
        ("autoscaling.x-k8s.io", "capacitybuffers", "patch"),
        ("autoscaling.x-k8s.io", "capacitybuffers", "delete"),
        ("autoscaling.x-k8s.io", "provisioningrequests", "list"),
        ("autoscaling.x-k8s.io", "provisioningrequests", "create"),
        ("autoscaling.x-k8s.io", "provisioningrequests", "delete"),
        ("", "podtemplates", "get"),
        ("", "podtemplates", "list"),
        ("", "podtemplates", "create"),
        ("", "podtemplates", "update"),
        ("", "podtemplates", "delete"),
    }


def test_dry_run_controller_cannot_change_workloads(rendered: dict[str, list[Obj]]) -> None:
    grants = rbac_grants(rendered["dry-run"], "forestall-controller")
    assert {(g, r) for g, r, _ in _write(grants["*"])} == {
        ("forestall.dev", "scalingpolicies/status"),
        ("events.k8s.io", "events"),
    }
    base = rbac_grants(rendered["base"], "forestall-controller")
    full = rbac_grants(rendered["cluster-autoscaler"], "forestall-controller")
    # Regression: the dry-run overlay got a 403 every cycle reading CapacityBuffers and ProvisioningRequests.
    reads = grants["*"] - _write(grants["*"])
    assert reads == full["*"] - _write(full["*"]), "reads everything the controller reads, in every install"
    assert grants[NAMESPACE] == base[NAMESPACE], "still elects a leader"


def test_balancer_only_reads_endpointslices_and_pods_in_the_model_namespace(
    rendered: dict[str, list[Obj]],
) -> None:
    for name in INSTALLS:
        assert rbac_grants(rendered[name], "forestall-balancer") == {}, "no cluster-wide or stray grants"
    grants = rbac_grants(rendered["base"] + rendered["examples"], "forestall-balancer")
    reads = {
        (g, r, v)
        for g, r in (("discovery.k8s.io", "endpointslices"), ("", "pods"))
        for v in ("list", "watch")
    }
    assert grants == {"llm": reads}
    # The namespace it may read is the one its --kube-service names.
    args = _find(rendered["base"], "Deployment", "forestall-balancer")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    services = [a.split("=", 1)[1] for a in args if a.startswith("--kube-service=")]
    assert {s.split("/")[0] for s in services} == set(grants)


# ------------------------------------------------------------------------------- CLI flags and the image


def _parse_or_skip(args: list[str]) -> None:
    """Parse container args with the real `forestall` parser (SystemExit on an unknown flag fails the test)."""
    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert subcommands is not None
    if args[0] not in subcommands:
        pytest.skip(f"`forestall {args[0]}` is not registered yet (its module has not landed)")
    try:
        parser.parse_args(args)
    except SystemExit as exc:  # argparse's way of rejecting a flag
        pytest.fail(f"`forestall {' '.join(args)}` is rejected by the CLI (exit {exc.code})")


@pytest.mark.parametrize("name", INSTALLS)
@pytest.mark.parametrize("deployment", ["forestall-controller", "forestall-balancer"])
def test_container_args_are_accepted_by_the_cli(
    rendered: dict[str, list[Obj]], name: str, deployment: str
) -> None:
    container = _find(rendered[name], "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
    _parse_or_skip(list(container["args"]))


def _flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {args}"
    return values[0]


def test_ports_in_args_match_containers_services_and_network_policies(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["base"]
    controller = _find(objs, "Deployment", "forestall-controller")["spec"]["template"]["spec"]["containers"][
        0
    ]
    metrics_port = int(_flag(controller["args"], "--metrics-port"))
    assert {p["name"]: p["containerPort"] for p in controller["ports"]} == {"metrics": metrics_port}
    service = _find(objs, "Service", "forestall-controller-metrics")
    assert [p["port"] for p in service["spec"]["ports"]] == [metrics_port]
    policy_ports = [
        p["port"]
        for r in _find(objs, "NetworkPolicy", "forestall-controller")["spec"]["ingress"]
        for p in r["ports"]
    ]
    assert policy_ports == [metrics_port]
    balancer = _find(objs, "Deployment", "forestall-balancer")["spec"]["template"]["spec"]["containers"][0]
    assert int(_flag(balancer["args"], "--listen").rsplit(":", 1)[1]) == PROXY_PORT
    assert int(_flag(balancer["args"], "--admin-listen").rsplit(":", 1)[1]) == ADMIN_PORT
    # Listeners bind all interfaces in a pod (the defaults are loopback, unreachable from the Service).
    assert _flag(balancer["args"], "--listen").startswith("0.0.0.0:")
    assert _flag(controller["args"], "--metrics-address") == "0.0.0.0"
    # Open streams get the termination grace minus the preStop sleep, not more.
    pod = _find(objs, "Deployment", "forestall-balancer")["spec"]["template"]["spec"]
    pre_stop_s = balancer["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert (
        float(_flag(balancer["args"], "--shutdown-grace-s")) + pre_stop_s
        < pod["terminationGracePeriodSeconds"]
    )


_TYPED_RESOURCES = {
    "deployment": ("apps", "deployments"),
    "stateful_set": ("apps", "statefulsets"),
    "pod": ("", "pods"),
    "pod_template": ("", "podtemplates"),
    "node": ("", "nodes"),
    "lease": ("coordination.k8s.io", "leases"),
    "priority_class": ("scheduling.k8s.io", "priorityclasses"),
    "endpoint_slice": ("discovery.k8s.io", "endpointslices"),
    "event": ("events.k8s.io", "events"),
}
_VERBS = {"list": ("list", "watch"), "read": ("get",), "create": ("create",), "patch": ("patch",)}
_VERBS |= {"replace": ("update",), "delete": ("delete",)}
_TYPED_CALL = re.compile(
    r"\.(list|read|create|patch|replace|delete)_((?:namespaced_)?[a-z_]+?)(_for_all_namespaces)?\b"
)


def test_every_typed_client_call_in_the_controller_is_granted(rendered: dict[str, list[Obj]]) -> None:
    """A static cross-check of controller/ against the RBAC, until the RBAC-vs-recorded-calls e2e test exists.

    Every call of the official client's typed APIs (`apps.replace_namespaced_deployment_scale`, ...) maps to
    (group, resource[/subresource], verb); lists are informers, so they need watch too. Custom-object calls
    (ScalingPolicies, CapacityBuffers, ProvisioningRequests) name their resource in arguments and are left to
    that e2e test. `create_priority_class` is the one call not granted: the base ships the PriorityClass.
    """
    grants = rbac_grants(rendered["cluster-autoscaler"] + rendered["examples"], "forestall-controller")
    granted = set().union(*grants.values())
    needed: dict[Grant, str] = {}
    for path in sorted((ROOT / "controller").rglob("*.py")):
        for verb, name, _all in _TYPED_CALL.findall(path.read_text()):
            name = name.removeprefix("namespaced_")
            if name.endswith("custom_object") or name.endswith("custom_object_status") or name == "fn":
                continue
            sub = ""
            for suffix in ("_scale", "_status"):
                if name.endswith(suffix) and name.removesuffix(suffix) in _TYPED_RESOURCES:
                    name, sub = name.removesuffix(suffix), "/" + suffix[1:]
            if name not in _TYPED_RESOURCES:
                continue  # not a Kubernetes resource method (read_text, create_task, ...)
            group, resource = _TYPED_RESOURCES[name]
            for rbac_verb in _VERBS[verb]:
                needed.setdefault((group, resource + sub, rbac_verb), path.name)
    assert len(needed) >= 15, f"the scan found too few calls to be meaningful: {sorted(needed)}"
    missing = {g: f for g, f in needed.items() if g not in granted}
    assert missing == {
        ("scheduling.k8s.io", "priorityclasses", "create"): "provisioners.py",
        # the finalizer's one-off list of the policy's PodTemplates: not an informer, so no watch
        ("", "podtemplates", "watch"): "provisioners.py",
    }
    typed = {resource for _, resource in _TYPED_RESOURCES.values()}
    unused = {g for g in granted - needed.keys() if g[1].split("/")[0] in typed}
    assert not unused, f"granted but never called: {sorted(unused)}"


# ------------------------------------------------------------------------------- the gateway overlay


def test_gateway_envoy_configmap_is_the_generated_bootstrap_and_envoy_accepts_it(tmp_path: Path) -> None:
    """The checked-in ConfigMap is `emulation.gateway.cluster_configmap()`, and Envoy 1.40 validates it."""
    from emulation import gateway as gateway_mod

    path = KUSTOMIZATIONS["gateway"] / "envoy-config.yaml"
    assert path.read_text() == gateway_mod.cluster_configmap(), (
        "regenerate: python -m emulation.gateway --cluster-configmap"
    )
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(yaml.safe_load(path.read_text())["data"]["envoy.yaml"])
    done = subprocess.run(
        [gateway_mod.envoy_binary(), "--mode", "validate", "-c", str(bootstrap)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_gateway_picker_args_ports_and_grants(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["gateway"]
    pod = _find(objs, "Deployment", "forestall-picker")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    _parse_or_skip(list(container["args"]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(_flag(container["args"], "--listen").rsplit(":", 1)[1]) == ports["grpc"]
    assert int(_flag(container["args"], "--admin-listen").rsplit(":", 1)[1]) == ports["admin"] == ADMIN_PORT
    pool = _flag(container["args"], "--kube-inference-pool")
    namespace, name = pool.split("/")
    inference_pool = _find(objs, "InferencePool", name)
    assert inference_pool["metadata"]["namespace"] == namespace
    assert inference_pool["spec"]["endpointPickerRef"]["port"]["number"] == ports["grpc"]
    assert rbac_grants(objs, "forestall-picker", namespace) == {
        namespace: {
            (g, r, v)
            for g, r in (("inference.networking.k8s.io", "inferencepools"), ("", "pods"))
            for v in ("list", "watch")
        }
    }
    # The Envoy bootstrap reaches the picker and the pool where the Services put them.
    envoy = yaml.safe_load(_find(objs, "ConfigMap", "forestall-gateway-envoy")["data"]["envoy.yaml"])
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    picker_address = clusters["picker"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"
    ]
    assert picker_address["socket_address"] == {
        "address": f"forestall-picker.{namespace}.svc.cluster.local",
        "port_value": ports["grpc"],
    }
    pool_address = clusters["pool"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"
    ]
    headless = _find(objs, "Service", "vllm-llama-8b-pool")
    assert headless["spec"]["clusterIP"] == "None"
    assert pool_address["socket_address"] == {
        "address": f"vllm-llama-8b-pool.{namespace}.svc.cluster.local",
        "port_value": inference_pool["spec"]["targetPorts"][0]["number"],
    }


def test_balancer_replicas_share_the_mcp_session_key_from_a_secret(rendered: dict[str, list[Obj]]) -> None:
    """M4: replicas behind a Service without affinity must open each other's sealed MCP session ids."""
    pod = _find(rendered["base"], "Deployment", "forestall-balancer")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    key_file = env["FORESTALL_BALANCER_SESSION_KEY_FILE"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume_name = mounts[key_file.rsplit("/", 1)[0]]
    volume = next(v for v in pod["volumes"] if v["name"] == volume_name)
    assert volume["secret"]["secretName"] == "forestall-balancer-session-key"
    assert not volume["secret"].get("optional", False)  # a replica must not start with a key of its own
