"""The lab: everything that runs Forestall's pipeline without a cluster. It ships with the tool, not in it.

    sim.py           the in-memory cluster `forestall simulate` drives (node/pod start-up delays, billing)
    streams.py       the simulated streams: FIFO queue over slots, placement with the balancer's picker, SLO
    simulate.py      `forestall simulate`'s engine: Forestall beside reactive autoscalers and the oracles
    simulate_cli.py  `forestall simulate`
    local.py         a cluster of real worker processes on this machine, for `forestall demo`
    demo.py          `forestall demo`: the real balancer and controller pipeline on local workers
    demo_cli.py      `forestall demo`
    worker.py        an emulated GPU inference server (vLLM-like API and /metrics)
    loadgen.py       the load generator (raw asyncio streams) for the demo, the e2e tests and bench/
    traces.py        demand traces: the bundled Azure trace (data/) and the shared real series

No production package (`controller`, `balancer`, `forecast`, `contract`) imports this one; an import-linter
contract keeps it so. It imports them freely: it runs the very code a cluster runs.
"""
