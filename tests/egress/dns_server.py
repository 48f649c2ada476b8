"""A DNS server on loopback that we own: answers A/AAAA from a table, optionally slowly.

Each query is answered from its own timer, so a slow name never delays a fast one: what is
measured is the proxy's resolver, not this server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, table: dict[str, list[str]] | None = None, slow: Callable[[str], float | None] | None = None) -> None:
        self.table = {k.rstrip(".").lower(): v for k, v in (table or {}).items()}
        self.slow = slow or (lambda name: None)  # seconds to wait before answering, or None
        self.queries: list[tuple[float, str, str]] = []  # (time, name, type)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def names(self) -> list[str]:
        with self._lock:
            return [n for _, n, _ in self.queries]

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                q = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - not our problem: drop it
                continue
            question = q.question[0]
            name = question.name.to_text().rstrip(".").lower()
            with self._lock:
                self.queries.append((time.monotonic(), question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
            resp = dns.message.make_response(q)
            addrs = self.table.get(name)
            if addrs is None:
                resp.set_rcode(dns.rcode.NXDOMAIN)
            else:
                want = "AAAA" if question.rdtype == dns.rdatatype.AAAA else "A" if question.rdtype == dns.rdatatype.A else None
                fit = [a for a in addrs if (":" in a) == (want == "AAAA")] if want else []
                if fit:
                    resp.answer.append(dns.rrset.from_text(question.name, 30, "IN", want, *fit))
            wire = resp.to_wire()
            delay = self.slow(name)
            if delay:
                t = threading.Timer(delay, self._send, (wire, peer))
                t.daemon = True
                with self._lock:
                    self._timers.append(t)
                t.start()
            else:
                self._send(wire, peer)

    def _send(self, wire: bytes, peer: tuple[str, int]) -> None:
        if not self._closed:
            try:
                self.sock.sendto(wire, peer)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        with self._lock:
            for t in self._timers:
                t.cancel()
