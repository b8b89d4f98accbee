"""Grafana dashboards for Forestall: `dashboards.generate` builds them; the JSON files beside it are its output."""
