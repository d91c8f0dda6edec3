"""Chaos fixtures: a sandbox process of its own (seeded faults, vaultspay settling by itself in
about a second), and stacks built on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.sandbox import SandboxProcess

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="session")
def chaos_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    import secrets

    server = SandboxProcess(
        tmp_path_factory.mktemp("chaos-sandbox"),
        fault_seed="20261122",
        # Credentials of this run only, so a leak check cannot be fooled by a common word.
        vai247_api_key=f"vai-{secrets.token_hex(12)}",
        vaultspay_client_secret=f"vps-{secrets.token_hex(12)}",
        pgv2_app_secret=f"pg-{secrets.token_hex(12)}",
        vaultspay_auto_advance_initiated_after_seconds="0.3",
        vaultspay_auto_advance_final_after_seconds="0.8",
        vaultspay_auto_advance_final_status="2",
        pgv2_settle_after_seconds="1",
    )
    server.start()
    yield server
    server.stop()


# Timings for chaos: quick polls and retries; a lease short enough that kills resolve fast.
CHAOS_ENV = {
    "REFUNDQ_POLL_SCHEDULE_SECONDS": "[0.5, 0.5, 1]",
    "REFUNDQ_DISPATCH_BATCH_SIZE": "2000",
    "REFUNDQ_POLL_BATCH_SIZE": "1000",
}


@pytest.fixture
def chaos_stack(stack_factory, chaos_sandbox: SandboxProcess):  # type: ignore[no-untyped-def]
    def make(redis=None, **env: str):  # type: ignore[no-untyped-def]
        stack = stack_factory(redis=redis, sandbox=chaos_sandbox, **{**CHAOS_ENV, **env})
        stack.sandbox.clear_faults()
        return stack

    yield make
    from tests.support.sandbox import SandboxAdmin

    SandboxAdmin(chaos_sandbox.base_url).clear_faults()
