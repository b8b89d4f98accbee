"""Demand input for `decide()`, one module per seam.

- `prometheus`: the history from Prometheus (range queries, incremental, on a regular grid);
- `balancers`: `/signals` asked of every balancer replica at once and merged;
- `history`: a history built from the signals, for policies without Prometheus;
- `registry`: one policy's parts put together (`PolicyDemand`), and every policy's (`Demands`, the Kubernetes
  loop's `controller.pipeline.DemandSource`).

Nothing here forecasts (`controller.forecasting`, called by `controller.pipeline`) or talks to Kubernetes.
"""
