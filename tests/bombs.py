"""The hostile workloads a neighbour may run, one place for the tests and the benchmark.

Each bomb is an argv for a sandbox of the `default` profile (or the profile it names)
that runs until killed or for ``seconds``, trying to hurt whoever shares the host:
processes, CPU, memory, disk, output, inodes, threads, egress. Nothing here talks to
any address off this machine: the egress flood asks the sandbox's own proxy for a
host the policy denies, so every request is refused on the host side.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass


def _py(code: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


@dataclass(frozen=True)
class Bomb:
    name: str
    argv: list[str]
    profile: str = "default"


def bombs(seconds: float = 8.0) -> list[Bomb]:
    s = float(seconds)
    return [
        Bomb("fork", ["bash", "-c", f"end=$((SECONDS+{int(s)})); bomb() {{ bomb | bomb & }}; "
                                    f"while [ $SECONDS -lt $end ]; do bomb 2>/dev/null; sleep 0.2; done"]),
        Bomb("cpu", _py(f"""
            import os, time
            end = time.time() + {s}
            for _ in range(64):
                try:
                    if os.fork() == 0:
                        while time.time() < end:
                            pass
                        os._exit(0)
                except OSError:
                    break
            while time.time() < end:
                pass
        """)),
        # Allocate until the cgroup OOM-kills it, once, then stay (the damage is in the first second).
        Bomb("memory-oom", ["sh", "-c", "python3 -c 'x=[]\nwhile 1: x.append(bytearray(32<<20))' 2>/dev/null; "
                                        f"sleep {int(s)}"]),
        Bomb("memory-loop", ["sh", "-c", f"end=$(( $(date +%s) + {int(s)} )); while [ $(date +%s) -lt $end ]; do "
                                         "python3 -c 'x=[]\nwhile 1: x.append(bytearray(32<<20))' 2>/dev/null; done"]),
        Bomb("disk-workspace", ["sh", "-c", f"end=$(( $(date +%s) + {int(s)} )); while [ $(date +%s) -lt $end ]; do "
                                            "dd if=/dev/zero of=/workspace/fill bs=1M count=200 2>/dev/null; "
                                            "rm -f /workspace/fill; done"]),
        Bomb("disk-tmp", ["sh", "-c", f"end=$(( $(date +%s) + {int(s)} )); while [ $(date +%s) -lt $end ]; do "
                                      "dd if=/dev/zero of=/tmp/fill bs=1M count=60 2>/dev/null; rm -f /tmp/fill; done"]),
        Bomb("output", ["sh", "-c", f"timeout {int(s)} yes 'flood flood flood flood flood flood flood'"]),
        Bomb("inodes", _py(f"""
            import os, time
            end = time.time() + {s}
            i = 0
            os.makedirs("/workspace/many", exist_ok=True)
            while time.time() < end:
                try:
                    open(f"/workspace/many/{{i % 50000}}", "w").close()
                except OSError:
                    for f in os.listdir("/workspace/many")[:5000]:
                        os.unlink(f"/workspace/many/{{f}}")
                i += 1
        """)),
        Bomb("threads", _py(f"""
            import threading, time
            end = time.time() + {s}
            def spin():
                while time.time() < end:
                    pass
            ts = []
            for _ in range(400):
                try:
                    t = threading.Thread(target=spin); t.start(); ts.append(t)
                except RuntimeError:
                    break
            for t in ts:
                t.join()
        """)),
        Bomb("egress", _py(f"""
            import socket, time
            end = time.time() + {s}
            while time.time() < end:
                try:
                    c = socket.create_connection(("127.0.0.1", 3128), timeout=2)
                    c.sendall(b"CONNECT denied.invalid:443 HTTP/1.1\\r\\nHost: denied.invalid:443\\r\\n\\r\\n")
                    c.recv(256)
                    c.close()
                except OSError:
                    time.sleep(0.01)
        """), profile="python-packages"),
    ]


# B's yardstick: a fixed amount of CPU work, timed inside the sandbox (seconds on stdout).
JOB = _py("""
    import time
    t = time.perf_counter()
    n = 0
    for i in range(600000):
        n += i * i
    print(f"{time.perf_counter() - t:.4f}")
""")
