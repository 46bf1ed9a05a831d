"""A TCP proxy on 127.0.0.1 that tests stop and start to cut a database off."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class TcpProxy:
    """Forward connections from a local port to ``upstream``.

    ``stop()`` closes the listening socket and every open connection, so the
    server behind it looks down; ``start()`` listens again on the same port.
    ``freeze()`` keeps the connections open but relays nothing more, like a
    host that froze or a network partition.
    With ``blackhole=True`` connections are accepted but get no response, like
    a server that hangs.
    """

    def __init__(
        self, upstream: tuple[str, int], blackhole: bool = False
    ) -> None:
        self.upstream = upstream
        self.blackhole = blackhole
        self.frozen = threading.Event()
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(
            target=self._accept, args=(listener,), daemon=True
        ).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    return
                self._sockets.add(client)
            if self.blackhole:
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.add(server)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pipe, args=(source, sink), daemon=True
                ).start()

    def freeze(self) -> None:
        """Stop relaying bytes while keeping every connection open."""
        self.frozen.set()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
