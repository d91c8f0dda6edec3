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

It overrides two kombu methods:
- `conn_or_acquire`, for the shared client; tests/integration/test_broker_transport.py counts
  the clients built, so a kombu that stopped calling it would fail there rather than quietly
  lose the saving.
- `_connparams`, so that a channel that outlived its connection fails with a connection error.
  When Redis goes away, Celery's consumer closes the broken connection twice (`collect()`, then
  `close()`); kombu detaches the transport from its connection on the first, and the second
  (or a late acknowledgement of a task that was running) rebuilds the channel's pool from a
  connection that is no longer there. kombu then raises AttributeError ("'NoneType' object has
  no attribute 'hostname'", celery/kombu#582), which Celery does not count as a connection
  error: the worker logged "Unrecoverable error" and stopped. In the chaos suite a Redis
  restart did that to a worker in 3 of 5 runs (1 of 6 with kombu's own transport), and in one
  CI run no worker was left working: 365 of 600 jobs stayed queued. A connection error is
  what it is: Celery logs it, carries on reconnecting, and the unacknowledged messages come
  back by the visibility timeout (or from the database, through the dispatcher, if Redis lost
  them).

`worker.app.celery_config` selects this transport for `redis://` broker URLs only; `rediss://`
(TLS) and other brokers keep kombu's own, because kombu derives TLS defaults from the URL's
scheme when it picks the transport itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
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

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError(
                "this channel's broker connection was closed (the broker went away); "
                "the worker reconnects on a new channel"
            )
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel
