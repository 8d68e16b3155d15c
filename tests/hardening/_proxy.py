"""A loopback TCP proxy that cuts its connections at random intervals (a flaky uplink between agents and broker).

Threads, bounded: at most ``max_conns`` connection pairs (more are refused), two pump threads per pair, one cutter.
``stop()`` closes everything and joins every thread within a few seconds.
"""

from __future__ import annotations

import random
import socket
import threading
import time


class CuttingProxy:
    """127.0.0.1:<port> → ``upstream``; every ``cut_min_s``..``cut_max_s`` all open connections are reset."""

    def __init__(self, upstream_port: int, *, cut_min_s: float = 0.3, cut_max_s: float = 2.0, max_conns: int = 64,
                 seed: int = 1) -> None:
        if not 0 < cut_min_s <= cut_max_s:
            raise ValueError(f"need 0 < cut_min_s <= cut_max_s, got {cut_min_s}, {cut_max_s}")
        self.upstream_port = upstream_port
        self.cut_min_s = cut_min_s
        self.cut_max_s = cut_max_s
        self.max_conns = max_conns
        self.rng = random.Random(seed)
        self.cuts = 0
        self.accepted = 0
        self.cutting = threading.Event()
        self.cutting.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        for target, name in ((self._accept_loop, "proxy-accept"), (self._cut_loop, "proxy-cut")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._pairs) >= self.max_conns
            if full:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            except OSError:
                client.close()  # the broker is down: the client sees a refused/closed connection, as it would
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        self._close_pair(src, dst)

    def _close_pair(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            self._pairs = [p for p in self._pairs if a not in p and b not in p]
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut_all(self) -> int:
        """Reset every open connection now; returns how many."""
        with self._lock:
            pairs = list(self._pairs)
        for a, b in pairs:
            self._close_pair(a, b)
        return len(pairs)

    def _cut_loop(self) -> None:
        while not self._stop.wait(self.rng.uniform(self.cut_min_s, self.cut_max_s)):
            if self.cutting.is_set() and self.cut_all():
                self.cuts += 1

    def stop(self) -> None:
        """Close the listener and every connection; join the accept and cut threads."""
        self._stop.set()
        self.listener.close()
        self.cut_all()
        deadline = time.monotonic() + 5
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
