"""Hostile input: every malformed request gets the API error shape and the server keeps serving."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

import httpx2 as httpx  # what anthropic ships; httpx is not a dependency
import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin

from .helpers import http

HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": "managed-agents-2026-04-01"}


def _auth(cp: ControlPlane) -> dict[str, str]:
    return {**HEADERS, "Authorization": f"Bearer {cp.environment_key}"}


def _alive(cp: ControlPlane) -> None:
    assert http().get(f"{cp.base_url}/local/v1/health", timeout=5).json() == {"status": "ok"}


def _raw(cp: ControlPlane, data: bytes) -> bytes:
    u = urlsplit(cp.base_url)
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
    return out


def _error(r: httpx.Response, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    assert r.headers.get("request-id", "").startswith("req_")


@pytest.mark.parametrize(
    "payload",
    [b"{", b"not json", b"[1, 2]", b'"events"', b"\xff\xfe", b"[" * 100000 + b"]" * 100000, b'{"events": NaN}'],
    ids=["truncated", "text", "array", "string", "not-utf8", "deeply-nested", "nan"],
)
def test_malformed_json_is_400(cp: ControlPlane, admin: LocalAdmin, payload: bytes) -> None:
    sid = admin.create_session(cp.environment_id)
    r = http().post(f"{cp.base_url}/v1/sessions/{sid}/events", content=payload, headers={**_auth(cp), "content-type": "application/json"})
    _error(r, 400, "invalid_request_error")
    _alive(cp)


@pytest.mark.parametrize(
    "events",
    [
        [],
        [{"type": "agent.tool_use", "name": "bash", "input": {}}],  # clients cannot speak for the model
        [{"type": "user.bogus"}],
        [{"no": "type"}],
        [{"type": "user.tool_result"}],
        [{"type": "user.message", "content": "not a list"}],
        [{"type": "user.message", "content": [{"type": "video"}]}],
        [{"type": "user.message", "content": [{"type": "text", "text": "x"}]}] * 101,
    ],
)
def test_bad_events_are_400(cp: ControlPlane, admin: LocalAdmin, events: list[object]) -> None:
    sid = admin.create_session(cp.environment_id)
    r = http().post(f"{cp.base_url}/v1/sessions/{sid}/events", json={"events": events}, headers=_auth(cp))
    _error(r, 400, "invalid_request_error")
    assert admin.events(sid) == []  # all-or-nothing


@pytest.mark.parametrize(
    "event",
    [
        {"type": "user.message", "content": []},
        {"type": "agent.tool_use", "name": "", "input": {}},
        {"type": "agent.tool_use", "name": "bash", "input": []},
        {"type": "agent.tool_use", "name": "bash", "input": {}, "evaluated_permission": "maybe"},
        {"type": "session.status_idle", "stop_reason": {"type": "bored"}},
        {"type": "session.exploded"},
    ],
)
def test_bad_injected_events_are_400(cp: ControlPlane, admin: LocalAdmin, event: dict[str, object]) -> None:
    sid = admin.create_session(cp.environment_id)
    r = http().post(
        f"{cp.base_url}/local/v1/sessions/{sid}/events", json={"events": [event]}, headers={"x-api-key": cp.admin_key}
    )
    _error(r, 400, "invalid_request_error")


@pytest.mark.parametrize("query", ["limit=1000000", "limit=0", "limit=-5", "limit=abc", "limit=99999999999999999999999", "order=sideways", "page=%%%", "page=Zm9v", "created_at[gt]=yesterday"])
def test_bad_list_parameters_are_400(cp: ControlPlane, admin: LocalAdmin, query: str) -> None:
    sid = admin.create_session(cp.environment_id)
    r = http().get(f"{cp.base_url}/v1/sessions/{sid}/events?{query}", headers=_auth(cp))
    _error(r, 400, "invalid_request_error")


@pytest.mark.parametrize("query", ["limit=101", "block_ms=abc", "reclaim_older_than_ms=-1"])
def test_bad_work_parameters_are_400(cp: ControlPlane, query: str) -> None:
    path = "work" if query.startswith("limit") else "work/poll"
    r = http().get(f"{cp.base_url}/v1/environments/{cp.environment_id}/{path}?{query}", headers=_auth(cp))
    _error(r, 400, "invalid_request_error")


def test_bad_heartbeat_and_stop_inputs(cp: ControlPlane, admin: LocalAdmin) -> None:
    admin.create_session(cp.environment_id)
    item = http().get(f"{cp.base_url}/v1/environments/{cp.environment_id}/work/poll", headers=_auth(cp)).json()
    base = f"{cp.base_url}/v1/environments/{cp.environment_id}/work/{item['id']}"
    _error(http().post(f"{base}/heartbeat?desired_ttl_seconds=soon", headers=_auth(cp)), 400, "invalid_request_error")
    _error(http().post(f"{base}/heartbeat?expected_last_heartbeat={'x' * 500}", headers=_auth(cp)), 400, "invalid_request_error")
    _error(http().post(f"{base}/stop", json={"force": "yes"}, headers=_auth(cp)), 400, "invalid_request_error")
    _error(http().post(f"{base}/heartbeat", headers={**_auth(cp), "anthropic-worker-id": "w"}, params={"expected_last_heartbeat": "nope"}), 412, "invalid_request_error")


def test_unknown_paths_and_methods(cp: ControlPlane) -> None:
    _error(http().get(f"{cp.base_url}/v1/nothing/here", headers=_auth(cp)), 404, "not_found_error")
    _error(http().get(f"{cp.base_url}/", headers=_auth(cp)), 404, "not_found_error")
    _error(http().get(f"{cp.base_url}/v1/sessions/{'a' * 500}", headers=_auth(cp)), 404, "not_found_error")
    _error(http().get(f"{cp.base_url}/v1/sessions/../../etc/passwd", headers=_auth(cp)), 404, "not_found_error")
    _error(http().delete(f"{cp.base_url}/v1/environments/{cp.environment_id}/work/poll", headers=_auth(cp)), 405, "invalid_request_error")
    _error(http().get(f"{cp.base_url}/v1/sessions/session_nope", headers=_auth(cp)), 404, "not_found_error")
    _alive(cp)


def test_missing_version_or_beta_headers_are_400(cp: ControlPlane) -> None:
    url = f"{cp.base_url}/v1/environments/{cp.environment_id}/work/stats"
    auth = {"Authorization": f"Bearer {cp.environment_key}"}
    _error(http().get(url, headers={**auth, "anthropic-beta": "managed-agents-2026-04-01"}), 400, "invalid_request_error")
    _error(http().get(url, headers={**auth, "anthropic-version": "2023-06-01"}), 400, "invalid_request_error")
    assert http().get(url, headers={**auth, **HEADERS, "anthropic-beta": "foo-1,managed-agents-2026-04-01"}).status_code == 200


def test_oversized_body_is_413_without_reading_it(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    head = (
        f"POST /v1/sessions/{sid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {cp.environment_key}\r\nanthropic-version: 2023-06-01\r\n"
        f"anthropic-beta: managed-agents-2026-04-01\r\nContent-Length: {9 << 20}\r\n\r\n"
    ).encode()
    out = _raw(cp, head + b'{"events": [')
    assert out.startswith(b"HTTP/1.1 413")
    assert b'"request_too_large"' in out
    _alive(cp)


def test_actually_sending_a_big_body_is_413(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    big = b'{"events": [{"type": "user.message", "content": [{"type": "text", "text": "' + b"x" * (9 << 20) + b'"}]}]}'
    try:
        r = http().post(f"{cp.base_url}/v1/sessions/{sid}/events", content=big, headers=_auth(cp), timeout=10)
        assert r.status_code == 413
    except httpx.TransportError:
        pass  # the server may close before the client finished writing; either way nothing was stored
    assert admin.events(sid) == []
    _alive(cp)


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /local/v1/health HTTP/9.9\r\n\r\n",
        b"GET " + b"/a" * 40000 + b" HTTP/1.1\r\n\r\n",
        b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: nope\r\n\r\n",
        b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /local/v1/health HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
    ],
    ids=["garbage", "http-9.9", "huge-uri", "bad-length", "negative-length", "chunked", "too-many-headers"],
)
def test_malformed_http_gets_a_json_error(cp: ControlPlane, raw: bytes) -> None:
    out = _raw(cp, raw)
    if out.startswith(b"HTTP/"):
        assert 400 <= int(out.split(b" ", 2)[1]) < 600
    # else: a one-word request line reads as HTTP/0.9, which has no status line or headers
    assert b'"type": "error"' in out
    _alive(cp)


@pytest.mark.parametrize(
    "raw",
    [
        # Two lengths: a proxy in front that frames by the first and this server by the last would
        # read the tail of the body as a second, smuggled request.
        b"POST /local/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
        b"POST /local/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: identity\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
        # A second Host, after the loopback one the rebinding check reads.
        b"GET /local/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
        # An obsolete folded line would continue the previous header for some parsers, not for others.
        b"GET /local/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\r\n Content-Length: 5\r\n\r\n",
        # A line without a colon: the stdlib's email parser took it as the start of the body.
        b"GET /local/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\nContent-Length: 5\r\n\r\nhello",
        # Space before the colon (RFC 9112 5.1: must be rejected).
        b"GET /local/v1/health HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n",
    ],
    ids=["two-content-lengths", "two-transfer-encodings", "two-hosts", "folded-line", "line-without-colon",
         "space-before-colon"],
)
def test_ambiguous_header_framing_is_refused_and_the_connection_closed(cp: ControlPlane, raw: bytes) -> None:
    out = _raw(cp, raw)  # reads until the server closes the connection
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert out.count(b"HTTP/1.1 ") == 1  # nothing after the refusal was read as a request
    assert b'"type": "error"' in out
    _alive(cp)


def test_client_vanishing_mid_body_and_mid_stream(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    u = urlsplit(cp.base_url)
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall(f"POST /v1/sessions/{sid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{{".encode())
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall(
            f"GET /v1/sessions/{sid}/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {cp.environment_key}\r\n"
            "anthropic-version: 2023-06-01\r\nanthropic-beta: managed-agents-2026-04-01\r\n\r\n".encode()
        )
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    admin.send_tool_use(sid, "bash", {})  # the stream's writer finds the socket gone
    _alive(cp)


def test_many_concurrent_streams_and_clean_shutdown(tmp_path: object) -> None:
    from pathlib import Path

    cp = ControlPlane(Path(str(tmp_path)) / "s", sse_ping_interval=10)
    cp.start()
    with LocalAdmin(cp.base_url, cp.admin_key, http_client=http()) as admin:
        sid = admin.create_session(cp.environment_id)
    done = threading.Barrier(21, timeout=10)

    def stream() -> None:
        try:
            with http().stream("GET", f"{cp.base_url}/v1/sessions/{sid}/events/stream", headers=_auth(cp), timeout=10) as r:
                for _ in r.iter_bytes():
                    pass
        except httpx.HTTPError:
            pass
        done.wait()

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(20)]
    for t in threads:
        t.start()
    import time

    time.sleep(0.3)
    cp.stop()  # must return promptly and end every open stream
    done.wait()
    with pytest.raises(httpx.TransportError):
        http().get(f"{cp.base_url}/local/v1/health", timeout=1)


def test_dns_rebinding_host_header_is_refused(cp: ControlPlane) -> None:
    port = cp.base_url.rsplit(":", 1)[1]
    url = f"{cp.base_url}/v1/environments/{cp.environment_id}/work/stats"
    r = http().get(url, headers={**_auth(cp), "Host": f"evil.example:{port}"})
    _error(r, 400, "invalid_request_error")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1"):
        assert http().get(url, headers={**_auth(cp), "Host": host}).status_code == 200
