"""In-sandbox egress forwarder: 127.0.0.1:3128 -> /run/sandbox-egress/proxy.sock.

STDLIB ONLY: this file is copied into the sandbox image, which has python3 and
nothing else. The sandbox has no network interface but ``lo``; this is how
HTTP_PROXY=http://127.0.0.1:3128 reaches the host's egress proxy. It relays
bytes and nothing more: it is as untrusted as everything else in the sandbox,
and every rule is enforced by the proxy on the other end of the socket.
"""

from __future__ import annotations

import socket
import sys
import threading

_BUF = 64 * 1024  # per direction per connection: the only buffer we hold
_MAX_CONNS = 128
_MSG = b"sandbox egress proxy is not reachable from this sandbox\n"
_UNAVAILABLE = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"X-Sandbox-Egress-Error: proxy-unavailable\r\nContent-Length: %d\r\n\r\n%s" % (len(_MSG), _MSG)
)  # the proxy enforces the real per-session limit; this just bounds threads


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    # Blocking recv/sendall: sendall only returns when the peer accepted the bytes, so a
    # slow reader on one side throttles the other instead of growing a buffer here.
    try:
        while True:
            data = src.recv(_BUF)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on (EOF after a request body)
        except OSError:
            pass


def _relay(client: socket.socket, socket_path: str, slots: threading.BoundedSemaphore) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            upstream.connect(socket_path)
        except OSError:
            # Say so instead of a bare reset, so `curl` prints something a person can act on.
            client.sendall(_UNAVAILABLE)
            client.shutdown(socket.SHUT_WR)
            return
        back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        back.start()
        _pipe(client, upstream)
        back.join()
    except OSError:
        pass
    finally:
        upstream.close()
        client.close()
        slots.release()


def serve(listen_port: int = 3128, socket_path: str = "/run/sandbox-egress/proxy.sock") -> None:
    """Accept on 127.0.0.1:listen_port forever, relaying each connection to ``socket_path``."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", listen_port))
    lsock.listen(128)
    slots = threading.BoundedSemaphore(_MAX_CONNS)
    while True:
        slots.acquire()
        try:
            client, _ = lsock.accept()
        except OSError:
            slots.release()
            continue
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_relay, args=(client, socket_path, slots), daemon=True).start()
        except (OSError, RuntimeError):  # e.g. the pids limit refused a new thread
            client.close()
            slots.release()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 3128
    path = sys.argv[2] if len(sys.argv) > 2 else "/run/sandbox-egress/proxy.sock"
    serve(port, path)
