"""The lab: everything that runs Forestall's pipeline without a cluster. It ships with the tool, not in it.

    lifecycle.py     the one node/pod model: lead times with jitter, whole-node billing, measured lead times,
                     the ReplicaSet's removal order (pure; sim.py, local.py and the test fakes use it)
    sim.py           the in-memory cluster `forestall simulate` drives (the lifecycle model as it is)
    streams.py       the simulated streams: FIFO queue over slots, placement with the balancer's picker, SLO
    runners.py       the simulated policies: Forestall through controller.pipeline, HPA, HPA + cluster-autoscaler
    results.py       a run's figures per policy (SLO, waits, GPU-hours against the oracles)
    simulate.py      `forestall simulate`'s engine: Forestall beside reactive autoscalers and the oracles
    frontier.py      `forestall simulate --sweep`: one policy field's values on the same streams, and the plot
    simulate_cli.py  `forestall simulate`
    local.py         the lifecycle model plus real worker processes on this machine, for `forestall demo`
    processes.py     free loopback port, port probe, process-group stopper (the lab, bench/ and tests/ share them)
    demo.py          `forestall demo`: the real balancer and controller pipeline on local workers
    demo_controller.py, demo_processes.py, demo_view.py   its pipeline seams, child processes and live view
    demo_cli.py      `forestall demo`
    gateway.py       a loopback Envoy + `forestall picker` + emulated workers, and the overlay's Envoy bootstrap
    worker.py        an emulated GPU inference server (vLLM-like API and /metrics)
    loadgen.py       the load generator and the one stream-outcome classification, for the demo, the e2e
                     tests and bench/
    traces.py        demand traces: the bundled Azure trace (data/) and the shared real series

No production package (`controller`, `balancer`, `forecast`, `contract`) imports this one; an import-linter
contract keeps it so. It imports them freely: it runs the very code a cluster runs.
"""
