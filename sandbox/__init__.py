"""Simulators of the four refund gateways (vai247, bbmsl, vaultspay, pgv2) on one ASGI app.

An independent implementation of each gateway's contract: it never imports `worker`, `tasks` or
`providers`, so a provider that passes against it has been checked by code that does not share
its assumptions by construction. See `sandbox/README.md`.
"""

from sandbox.app import create_app
from sandbox.config import SandboxConfig

__all__ = ["SandboxConfig", "create_app"]
