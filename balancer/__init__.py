"""Forestall balancer: a least-loaded stream proxy for GPU inference and MCP.

A stream counts as load on its backend from the moment it is placed until its last byte (a lease), normalised by
the backend's capacity weight, so new streams go where decoding capacity is free rather than where the fewest
requests were recently opened. It works with the controller: new pods warm up, drained pods get no new streams
and report what is left on them, and `/signals` tells the controller where the load and the hotspots are.

Modules, from the bottom up:
    picking.py      pure choice of a backend from a snapshot (shared with the simulator)
    config.py       BalancerConfig and the backends-file schema (flags / env / file), errors.py
    backends.py     the backend table and stream leases
    health.py       outlier ejection, retry budget, errors hidden in 200s
    warmup.py       slow start of joining backends; admission.py the bounded admission queue
    sessions.py     sealed MCP sessions (shared key, no shared table), bounded loads, consistent hashing
    runtime.py      the Balancer object tying those together, and placement
    inbound.py      what the client listener accepts and forwards (routes, methods, header bytes, hygiene)
    responses.py    the balancer's own answers (generic JSON errors) and log redaction
    proxy.py        the HTTP relay and its attempt state machine; websockets.py the WebSocket relay
    relay.py        the body relay at the asyncio-protocol level (after the response head)
    discovery.py    static backends file; endpointslices.py Kubernetes EndpointSlices over plain REST
    scraping.py     backend-reported queues from /metrics; capacity.py the concurrency limit learned from them
    reporting.py    hotspots and the /signals document (schema in contract/signals.py); metrics.py Prometheus
    listeners.py    client connection caps, header deadline, keep-alive, quiet malformed-request logs
    app.py          the proxy and admin aiohttp apps, background tasks, listeners (TLS, admin TLS)
    cli.py          `forestall balancer`
    inferencepools.py  discovery from a GIE InferencePool and its pods
    extproc.py      the gateway endpoint picker: GIE Endpoint Picker Protocol over Envoy ext_proc (gRPC)
    picker.py       the picker's wiring (ext_proc server + the admin app); picker_cli.py `forestall picker`
"""
