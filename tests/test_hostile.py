"""Hostile peers and bad arguments: every resource bounded, no panic, no reply mixed up.

Each test plays one misbehaviour with a peer written here against a real server or client
on loopback, and checks that framesock stays within its limits and says what happened.
"""

from __future__ import annotations

import asyncio

import pytest

import framesock
from framesock import aio


# --- no panic reaches Python ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e20, float("inf"), float("nan"), -1.0, 0.0])
def test_timeouts_out_of_range_are_value_errors_naming_the_argument(value):
    with pytest.raises(ValueError, match="timeout"):
        framesock.Client("127.0.0.1", 9, timeout=value)
    with pytest.raises(ValueError, match="timeout"):
        framesock.Server(port=0, timeout=value)
    with pytest.raises(ValueError, match="idle_timeout"):
        framesock.Server(port=0, idle_timeout=value)
    with pytest.raises(ValueError, match="timeout"):
        framesock.start_client(port=9, timeout=value)
    with pytest.raises(ValueError, match="timeout"):
        aio.Client(port=9, timeout=value)
    with framesock.Server(port=0) as server:
        with pytest.raises(ValueError, match="timeout"):
            server.shutdown(timeout=value)


@pytest.mark.parametrize("name", ["max_connections", "handler_threads"])
@pytest.mark.parametrize("value", [0, -1, 2**62])
def test_counts_out_of_range_are_value_errors_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        framesock.Server(port=0, **{name: value})


def test_a_huge_but_allowed_timeout_works():
    with framesock.Server(port=0, protocol="framed", timeout=1e9, idle_timeout=1e9) as server:
        with framesock.Client(*server.address[:2], protocol="framed", timeout=1e9) as client:
            assert client.request("x") == {"key": "id", "val": 123}
        server.shutdown(timeout=1e9)
