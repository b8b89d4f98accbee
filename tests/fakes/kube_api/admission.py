"""Pod Security admission for the fake API server: the `restricted` level, enforced on pod creation.

kube-apiserver's PodSecurity admission plugin enforces the level a namespace names in its label
`pod-security.kubernetes.io/enforce`; a pod that violates it is refused with 403 Forbidden and a message
listing each check that failed (`violates PodSecurity "restricted:latest": ...`). This module implements the
checks of the `baseline` and `restricted` levels that a controller-made pod can trip:

- baseline: no host namespaces (`hostNetwork`, `hostPID`, `hostIPC`), no `privileged` container, no
  `hostPath` volume, no `hostPort`, capabilities added only from the baseline set, seccomp not `Unconfined`;
- restricted: `allowPrivilegeEscalation: false`, `runAsNonRoot: true` and `runAsUser` not 0 (pod or every
  container), `seccompProfile` `RuntimeDefault` or `Localhost` (pod or every container), capabilities dropping
  `ALL` and adding at most `NET_BIND_SERVICE`, volumes of the allowed types only.

What it does not check: AppArmor and SELinux options, `/proc` mount type, sysctls, Windows pods, the
`warn`/`audit` modes, version pinning (`enforce-version`), exemptions, or workload objects (real PSA only
warns on those too).
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]

ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"

BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)


def violations(pod: Obj, level: str) -> list[str]:
    """The failed checks of `level` ("privileged", "baseline", "restricted") for a pod; empty: admitted."""
    if level not in ("baseline", "restricted"):
        return []
    spec = pod.get("spec") or {}
    pod_sc = spec.get("securityContext") or {}
    containers = [
        *(spec.get("initContainers") or []),
        *(spec.get("containers") or []),
        *(spec.get("ephemeralContainers") or []),
    ]
    out: list[str] = []

    def each(label: str, bad: list[str], fix: str) -> None:
        if bad:
            names = ", ".join(f'"{n}"' for n in bad)
            out.append(f"{label} (container{'s' if len(bad) > 1 else ''} {names} {fix})")

    host = [k for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    if host:
        out.append(f"host namespaces ({'=true, '.join(host)}=true)")
    each(
        "privileged",
        [c["name"] for c in containers if (c.get("securityContext") or {}).get("privileged")],
        "must not set securityContext.privileged=true",
    )
    host_path = [v["name"] for v in spec.get("volumes") or [] if "hostPath" in v]
    if host_path:
        out.append(f"hostPath volumes (volumes {', '.join(repr(v) for v in host_path)})")
    each(
        "hostPort",
        [c["name"] for c in containers if any(p.get("hostPort") for p in c.get("ports") or [])],
        "uses hostPort",
    )
    each(
        "non-default capabilities",
        [
            c["name"]
            for c in containers
            if set(((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or [])
            - BASELINE_CAPABILITIES
        ],
        "must not include capabilities beyond the baseline set in securityContext.capabilities.add",
    )

    def seccomp(sc: Obj) -> str | None:
        return ((sc or {}).get("seccompProfile") or {}).get("type")

    if seccomp(pod_sc) == "Unconfined" or any(
        seccomp(c.get("securityContext") or {}) == "Unconfined" for c in containers
    ):
        out.append('seccompProfile (pod or containers must not set type to "Unconfined")')
    if level == "baseline":
        return out

    each(
        "allowPrivilegeEscalation != false",
        [
            c["name"]
            for c in containers
            if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False
        ],
        "must set securityContext.allowPrivilegeEscalation=false",
    )
    each(
        "unrestricted capabilities",
        [
            c["name"]
            for c in containers
            if "ALL" not in (((c.get("securityContext") or {}).get("capabilities") or {}).get("drop") or [])
            or set(((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or [])
            - {"NET_BIND_SERVICE"}
        ],
        'must set securityContext.capabilities.drop=["ALL"]',
    )
    if pod_sc.get("runAsNonRoot") is not True:
        each(
            "runAsNonRoot != true",
            [
                c["name"]
                for c in containers
                if (c.get("securityContext") or {}).get("runAsNonRoot") is not True
            ],
            "must set securityContext.runAsNonRoot=true",
        )
    elif any((c.get("securityContext") or {}).get("runAsNonRoot") is False for c in containers):
        out.append("runAsNonRoot != true (a container sets securityContext.runAsNonRoot=false)")
    if pod_sc.get("runAsUser") == 0 or any(
        (c.get("securityContext") or {}).get("runAsUser") == 0 for c in containers
    ):
        out.append("runAsUser=0 (pod and containers must not set runAsUser=0)")
    if seccomp(pod_sc) not in ("RuntimeDefault", "Localhost"):
        each(
            "seccompProfile",
            [
                c["name"]
                for c in containers
                if seccomp(c.get("securityContext") or {}) not in ("RuntimeDefault", "Localhost")
            ],
            'must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost"',
        )
    bad_volumes = [
        v["name"]
        for v in spec.get("volumes") or []
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES and "hostPath" not in v
    ]
    if bad_volumes:
        out.append(f"restricted volume types (volumes {', '.join(repr(v) for v in bad_volumes)})")
    return out
