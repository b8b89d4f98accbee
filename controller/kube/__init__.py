"""Kubernetes, through the official `kubernetes` client: the only package of the controller that imports it.

- `api`: building an `ApiClient` (kubeconfig or in-cluster), raw JSON calls, retrying temporary failures and
  translating `ApiException` into `controller.errors` at the seam.
- `informer`: list+watch caches (pods, nodes, workloads, ScalingPolicies) kept on threads, so a reconcile
  reads memory instead of the API server.
- `cluster`: `KubeCluster`, the `controller.cluster.Cluster` for one policy's scale target.
- `provisioners`: GPU capacity ahead of demand: `pods`, `capacityBuffer`, `placeholder`, `provisioningRequest`.
- `reporting`: ScalingPolicy status writes and Kubernetes Events.
- `lease`: leader election on a `coordination.k8s.io/v1` Lease.

Everything here blocks (the client is synchronous); the async loop calls it on worker threads.
"""
