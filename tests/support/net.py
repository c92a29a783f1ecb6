"""Loopback ports for servers and rendezvous the tests start (one implementation, shared with the benches)."""

from __future__ import annotations

from primaps_dist.testing.http_server import free_port

__all__ = ["free_port"]
