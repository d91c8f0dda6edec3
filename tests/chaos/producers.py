"""A racing producer process for the chaos suite (run by multiprocessing, spawn)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def race(tag: str, process: int, threads: int, keys: int) -> list[tuple[str, str, str, str]]:
    """Every thread enqueues every key; a quarter of the threads ask for a different amount."""
    from worker.client import enqueue_refund
    from worker.errors import IdempotencyConflict

    def producer(thread: int) -> list[tuple[str, str, str, str]]:
        different = (process * threads + thread) % 4 == 3
        amount = "40.00" if different else "30.00"
        results = []
        for key in range(keys):
            idempotency_key = f"{tag}-key-{key}"
            try:
                view = enqueue_refund(
                    provider="vai247",
                    payment_ref=f"{tag}-ord-{key}",
                    amount=amount,
                    currency="USD",
                    idempotency_key=idempotency_key,
                    original_amount="100.00",
                )
                results.append((idempotency_key, amount, "job", view.id))
            except IdempotencyConflict:
                results.append((idempotency_key, amount, "conflict", ""))
        return results

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [r for chunk in pool.map(producer, range(threads)) for r in chunk]
