"""The protocol-level relay's tests (tests/integration/test_balancer_protocol_relay.py), on uvloop."""

from tests.integration.test_balancer_protocol_relay import *  # noqa: F403  (the same tests, another loop)
