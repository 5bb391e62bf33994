"""A fault-injecting TCP relay for tests: added latency, stalled and cut connections.

This kernel has no netem, so faults are injected here, between harness and a real sshd on
loopback. Faults apply to the connections open when they are injected; later connections
pass (a reconnect can succeed, as after a real glitch).
"""
import socket
import threading
import time
from typing import List, Tuple


class _Link:
    def __init__(self, client: socket.socket, server: socket.socket):
        self.client = client
        self.server = server
        self.stalled = threading.Event()
        self.closed = threading.Event()

    def cut(self) -> None:
        self.closed.set()
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class FaultRelay:
    def __init__(self, target: Tuple[str, int], delay_s: float = 0.0):
        self.target = target
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._links: List[_Link] = []
        self._lock = threading.Lock()
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._pump, args=(link, client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, server, client), daemon=True).start()

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not link.closed.is_set():
                data = source.recv(65536)
                if not data:
                    break
                while link.stalled.is_set() and not link.closed.is_set():
                    time.sleep(0.05)  # hold the data: the connection hangs, open but silent
                if self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            if not link.stalled.is_set():
                link.cut()

    def stall(self) -> int:
        """Freeze every open connection; returns how many."""
        with self._lock:
            for link in self._links:
                link.stalled.set()
            return len(self._links)

    def cut(self) -> int:
        """Close every open connection abruptly; returns how many."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.cut()
        return len(links)

    def close(self) -> None:
        self._stopping = True
        self._listener.close()
        self.cut()
