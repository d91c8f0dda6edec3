"""kombu's Redis transport, with one Redis client per channel instead of one per command.

kombu's Redis channel builds a new `redis.Redis` object for every publish, every task event,
every acknowledgement (`Channel.conn_or_acquire`). The client is only a front for the
channel's connection pool, which is kept, but redis-py 8 builds its command-callback tables in
each client's constructor: 145-190 us of CPU per client on our 2-core machine, more than the
LPUSH round trip it is built for (BENCHMARKS.md, fourth round). A job pays for about six of
them: its publish and task-sent event in the producer, and in the worker the unacked-index
write, the task events and the acknowledgement.

This channel builds the client once and reuses it. That is safe because a `redis.Redis` on a
pool holds no connection of its own: each command checks one out of the pool and returns it,
so one client can serve every caller of the channel, threads included, and redis-py's pool
resets itself in a forked child. If kombu replaces the channel's pool (after a connection
error), the next command builds a client on the new one.

It overrides one kombu method, `conn_or_acquire`;
tests/integration/test_broker_transport.py counts the clients built, so a kombu that stopped
calling it would fail there rather than quietly lose the saving.

`worker.app.celery_config` selects this transport for `redis://` broker URLs only; `rediss://`
(TLS) and other brokers keep kombu's own, because kombu derives TLS defaults from the URL's
scheme when it picks the transport itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

# Celery's `broker_transport` setting: a kombu transport named by its import path.
TRANSPORT = "worker.broker:Transport"


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel
