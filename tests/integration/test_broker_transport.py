"""refundq's Redis transport (worker/broker.py) builds one Redis client per channel, where
kombu's builds one per publish, event and acknowledgement (issue 7: 150-190 us of CPU each).
Against the run's own redis-server: messages still go through, in order, and are acknowledged;
the control with kombu's transport shows what the count would be without it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.common import ignore_errors

from tests.support.services import RedisServer
from tests.support.stack import unique
from worker import broker
from worker.app import celery_config
from worker.settings import Settings

MESSAGES = 20


@contextmanager
def clients_built() -> Iterator[list[object]]:
    built: list[object] = []
    original = redis.Redis.__init__

    def counting(self: redis.Redis, *args: object, **kwargs: object) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    redis.Redis.__init__ = counting  # type: ignore[method-assign]
    try:
        yield built
    finally:
        redis.Redis.__init__ = original  # type: ignore[method-assign]


def round_trip(url: str, transport: str | None) -> tuple[list[object], list[int]]:
    """Put MESSAGES messages, get and acknowledge each; the clients built meanwhile and the
    bodies received."""
    queue_name = unique("q")
    with Connection(url, transport=transport) as connection:
        queue = connection.SimpleQueue(queue_name)
        queue.put(-1)  # declares and connects before counting
        queue.get(timeout=5).ack()
        with clients_built() as built:
            for i in range(MESSAGES):
                queue.put(i)
            received = []
            for _ in range(MESSAGES):
                message = queue.get(timeout=5)
                received.append(message.payload)
                message.ack()
        leftover = connection.default_channel.client.llen(queue_name)
        queue.close()
    assert leftover == 0
    return built, received


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url_for(5)


def test_puts_gets_and_acks_reuse_one_client(redis_url):
    built, received = round_trip(redis_url, broker.TRANSPORT)
    assert received == list(range(MESSAGES))
    assert len(built) <= 1, f"{len(built)} Redis clients built for {MESSAGES} messages"


def test_control_kombus_transport_builds_a_client_per_command(redis_url):
    built, received = round_trip(redis_url, None)
    assert received == list(range(MESSAGES))
    assert len(built) >= 2 * MESSAGES  # a put and an ack each, at least


def test_a_new_pool_gets_a_new_client(redis_url):
    """After kombu drops a channel's pool (a connection error does), the next command must not
    go through a client of the old pool."""
    with Connection(redis_url, transport=broker.TRANSPORT) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first:
            first.ping()
        channel._pool = None
        with channel.conn_or_acquire() as second:
            second.ping()
        assert second is not first
        assert second.connection_pool is channel.pool


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", broker.TRANSPORT),
        ("rediss://127.0.0.1:6380/0", None),
        ("amqp://guest@127.0.0.1//", None),
    ],
)
def test_the_app_uses_it_for_plain_redis_only(url, expected):
    settings = Settings(broker_url=url)
    assert celery_config(settings)["broker_transport"] == expected


_detached: list[Any] = []


@pytest.fixture(autouse=True)
def _no_restore_at_exit() -> Iterator[None]:
    """kombu also restores a channel's unacknowledged messages when the process exits; these
    channels cannot, by design, so that would only print their error at exit."""
    yield
    while _detached:
        _detached.pop().do_restore = False


def detached_channel_with_unacked(url: str, transport: str | None) -> tuple[Any, Any, Any]:
    """A channel in the state a worker's channel is in after Celery's first attempt to close
    its broken connection: a delivered, unacknowledged message; its pool dropped (kombu's
    `Channel.close` does that first); its transport detached from the connection (kombu's
    `Connection._do_close_transport`); the channel itself not closed yet, because that close
    failed on the dead server."""
    connection = Connection(url, transport=transport)
    channel = connection.default_channel
    queue_name = unique("q")
    channel.queue_declare(queue_name)
    channel.basic_publish(channel.prepare_message("refund"), "", queue_name)
    message = channel.basic_get(queue_name, no_ack=False)
    assert message is not None
    channel._disconnect_pools()
    connection._do_close_transport()
    _detached.append(channel)
    return connection, channel, message


def test_a_channel_that_outlived_its_connection_fails_with_a_connection_error(redis_url):
    """What killed workers when Redis restarted (chaos suite): a late acknowledgement on such a
    channel, or Celery's second close of the broken connection, must raise an error Celery
    handles as a lost connection, never one that stops the worker."""
    _, _, message = detached_channel_with_unacked(redis_url, broker.TRANSPORT)
    with pytest.raises(broker.Transport.connection_errors):
        message.ack()
    connection, channel, _ = detached_channel_with_unacked(redis_url, broker.TRANSPORT)
    ignore_errors(connection, connection.close)  # what Celery's consumer does next
    assert channel.closed


def test_control_kombus_transport_fails_with_attribute_error_there(redis_url):
    _, _, message = detached_channel_with_unacked(redis_url, None)
    with pytest.raises(AttributeError):
        message.ack()
    connection, _, _ = detached_channel_with_unacked(redis_url, None)
    with pytest.raises(AttributeError):
        ignore_errors(connection, connection.close)
