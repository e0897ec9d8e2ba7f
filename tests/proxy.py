"""A TCP proxy the test controls: ``cut()`` drops every connection and refuses new ones (the store is
unreachable), ``restore()`` lets traffic through again. The honest way to take PostgreSQL away from
one worker without touching the server other tests use."""

from __future__ import annotations

import socket
import subprocess
import threading
from dataclasses import dataclass


class Proxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.conns.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


def proxied(dsn: str, proxy: Proxy) -> str:
    """The same PostgreSQL DSN, through the proxy."""
    from urllib.parse import urlparse

    target = urlparse(dsn)
    return dsn.replace(f"{target.hostname}:{target.port}", f"127.0.0.1:{proxy.port}")


def for_dsn(dsn: str) -> Proxy:
    from urllib.parse import urlparse

    target = urlparse(dsn)
    return Proxy(target.hostname, target.port or 5432)


@dataclass
class ProxiedWorker:
    proxy: Proxy
    topic: str
    group: str
    port: int
    worker: subprocess.Popen


def proxied_worker(kafka, model: str, pg_dsn: str, pg_table: str, log: str, partitions: int,
                   *extra: str) -> ProxiedWorker:
    """A stream worker on a new topic whose PostgreSQL sink goes through a TCP proxy (to cut and restore)."""
    from tests.conftest import free_port

    proxy = for_dsn(pg_dsn)
    topic = kafka.topic(partitions=partitions)
    group, port = f"g-{pg_table}", free_port()
    worker = kafka.worker("--model", model, "--topic", topic, "--group", group, "--sink",
                          f"{proxied(pg_dsn, proxy)}?table={pg_table}", "--metrics-port", str(port), *extra, log=log)
    return ProxiedWorker(proxy, topic, group, port, worker)
