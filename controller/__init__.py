"""Forestall controller: the reconcile loop, the ScalingPolicy API and the `forestall` CLI."""
