"""Forestall controller: the ScalingPolicy API, `decide()`, the reconcile pipeline and the Kubernetes loop."""
