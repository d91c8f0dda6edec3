"""`create_app`: the four simulated gateways and the admin API on one ASGI app.

All gateways share one base URL (`http://127.0.0.1:PORT`) because their paths do not overlap,
which keeps the demo and the benchmarks to one process and one port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from sandbox.admin import AdminApi
from sandbox.bbmsl import Bbmsl
from sandbox.config import SandboxConfig
from sandbox.pgv2 import Pgv2
from sandbox.state import Sandbox
from sandbox.vai247 import Vai247
from sandbox.vaultspay import Vaultspay


def create_app(config: SandboxConfig | None = None) -> FastAPI:
    """A fresh sandbox with its own in-memory state. `app.state.sandbox` is that state."""
    sandbox = Sandbox(config or SandboxConfig())
    vai247 = Vai247(sandbox)
    bbmsl = Bbmsl(sandbox)
    vaultspay = Vaultspay(sandbox)
    pgv2 = Pgv2(sandbox)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # Let in-flight callbacks finish (their own timeout bounds this), then close the client.
        await sandbox.drain()
        await vaultspay.aclose()

    app = FastAPI(
        title="refundq gateway sandbox",
        description="Simulated vai247, bbmsl, vaultspay and pgv2 gateways; see sandbox/README.md.",
        lifespan=lifespan,
    )
    app.state.sandbox = sandbox
    for router in (vai247.router(), bbmsl.router(), vaultspay.router(), pgv2.router()):
        app.include_router(router)
    app.include_router(AdminApi(sandbox, bbmsl=bbmsl, vaultspay=vaultspay, pgv2=pgv2).router())
    return app
