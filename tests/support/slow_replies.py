"""A TCP proxy on loopback to a server: once told to (`hold_replies`), it holds back every reply
from the server for a while, so a client behind it spends that time blocked reading a reply,
which is the moment a test wants to reach it (with a signal, say). `reply_held` says when a
reply is being held right now."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class SlowReplies:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.hold_seconds = 0.0
        self.reply_held = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._stopped = threading.Event()

    def __enter__(self) -> SlowReplies:
        threading.Thread(target=self._accept, name="slow-replies", daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def hold_replies(self, seconds: float) -> None:
        self.hold_seconds = seconds

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, server]
            for source, sink, hold in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, hold), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, hold: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if hold and self.hold_seconds:
                    self.reply_held.set()
                    # The point of the proxy: the client waits this long for its reply.
                    time.sleep(self.hold_seconds)
                    self.reply_held.clear()
                sink.sendall(chunk)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
