"""Forestall balancer: a least-loaded stream proxy for GPU inference and MCP."""
