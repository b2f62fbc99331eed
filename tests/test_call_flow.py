"""The one call flow's edges: what a call holds goes back, and clients see what they'd see."""

from __future__ import annotations

import gc
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import anyio
import httpx
import pytest
import requests
import requests.adapters
import urllib3

from upstream_guard import CircuitOpenError, Guard, GuardSettings, RetriesExhaustedError
from upstream_guard.testing import FakeClock


def settings(host: str, **groups) -> GuardSettings:
    return GuardSettings(upstreams={"up": {"hosts": [host], **groups}})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: ClassVar[Counter[str]] = Counter()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.hits[self.path] += 1
        if self.path == "/truncated":  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"a" * 10)
            self.close_connection = True
            return
        status = 503 if self.path == "/fail" else 200
        self.send_response(status)
        self.send_header("Set-Cookie", f"sid=s{status}; Path=/")
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")  # the size a GET would get; no body follows
        self.end_headers()


@pytest.fixture
def server() -> Iterator[str]:
    """A plain HTTP/1.1 server on loopback: /ok, /fail (503), /truncated."""
    _Handler.hits = Counter()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_probe_that_raises_something_else_gives_its_slot_back():
    """A half-open probe ended by an error that is no attempt's (an inner guard's) frees its slot."""
    clock = FakeClock()
    guard = Guard(
        settings("up.test", retry={"attempts": 1}, breaker={"fail_max": 1, "reset_timeout_s": 10}),
        clock=clock,
    )
    answer = {"mode": "503"}

    def handler(request: httpx.Request) -> httpx.Response:
        if answer["mode"] == "inner":
            raise CircuitOpenError("refused below", upstream="other", reason="circuit_open")
        return httpx.Response(503 if answer["mode"] == "503" else 200, content=b"x")

    client = httpx.Client(transport=guard.sync_transport(httpx.MockTransport(handler)))
    assert client.get("http://up.test/a").status_code == 503
    clock.advance(11)
    answer["mode"] = "inner"
    with pytest.raises(CircuitOpenError):
        client.get("http://up.test/a")
    answer["mode"] = "ok"
    clock.advance(11)
    assert client.get("http://up.test/a").status_code == 200
    assert guard.state("up") == "closed"


@pytest.mark.anyio
async def test_an_httpx2_transport_of_the_users_own_is_guarded_as_httpx2(clock):
    """A subclass of httpx2's base transport gets httpx2's errors, retries and breaker."""
    import httpx2

    class Refusing(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request):
            raise httpx2.ConnectError("refused", request=request)

    guard = Guard(settings("up.test", retry={"attempts": 2}, breaker={"fail_max": 2}), clock=clock)
    transport = guard.async_transport(Refusing())
    assert isinstance(transport, httpx2.AsyncBaseTransport)
    async with httpx2.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx2.ConnectError) as info:
            await client.get("http://up.test/v1/me")
    assert isinstance(info.value, RetriesExhaustedError)
    assert guard.state("up") == "open"


@pytest.mark.anyio
async def test_a_cancel_scope_bounds_a_failure_answers_body_too(clock):
    """With an inner transport that ignores timeouts, a slow 503 body ends within attempt_s."""

    class SlowBody(httpx.AsyncByteStream):
        async def __aiter__(self):
            await anyio.sleep_forever()
            yield b""

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, stream=SlowBody())

    guard = Guard(settings("up.test", retry={"attempts": 1}, timeout={"attempt_s": 0.05}))
    async with httpx.AsyncClient(
        transport=guard.async_transport(httpx.MockTransport(handler))
    ) as client:
        with anyio.fail_after(5):
            with pytest.raises(httpx.TimeoutException):
                await client.get("http://up.test/v1/me")


def test_requests_keeps_the_cookies_of_failure_answers_and_kept_copies(server):
    """Set-Cookie on a 503, and on a 2xx kept for stale-if-error, reach the session's jar."""
    guard = Guard(settings(server, retry={"attempts": 1}, fallback={"stale_if_error": True}))
    for path, cookie in (("/ok", "s200"), ("/fail", "s503")):
        session = guard.requests_session()
        response = session.get(f"http://{server}{path}", timeout=5)
        assert response.cookies["sid"] == cookie
        assert session.cookies["sid"] == cookie


def test_requests_retries_a_body_that_breaks(server):
    """A 2xx whose body is cut short is the attempt's failure: retried, then the client's error."""
    guard = Guard(settings(server, retry={"attempts": 3, "backoff_base_s": 0}))
    with pytest.raises(requests.exceptions.ChunkedEncodingError) as info:
        guard.requests_session().get(f"http://{server}/truncated", timeout=5)
    assert isinstance(info.value, RetriesExhaustedError)
    assert _Handler.hits["/truncated"] == 3


def test_requests_takes_a_urllib3_timeout_with_a_total(server):
    """urllib3.Timeout(total=...) works as it does without the guard."""
    session = Guard(settings(server)).requests_session()
    for timeout in (urllib3.Timeout(total=5), urllib3.Timeout(connect=2, read=3, total=5)):
        assert session.get(f"http://{server}/ok", timeout=timeout).status_code == 200


def test_guard_instrument_holds_its_guard_until_closed(server):
    """guard.instrument() keeps guarding with no other reference; close() undoes it."""
    events = []
    guard = Guard(settings(server))
    guard.subscribe(events.append)
    guard.instrument()
    close = guard.close
    del guard
    gc.collect()
    assert requests.get(f"http://{server}/ok", timeout=5).status_code == 200
    assert [e.outcome for e in events] == ["success"]
    close()
    assert not hasattr(requests.adapters.HTTPAdapter.send, "__upstream_guard__")


def test_requests_head_answers_have_no_body_to_wait_for(server):
    """A HEAD's Content-Length promises a body that never comes: read as requests reads it."""
    response = Guard(settings(server)).requests_session().head(f"http://{server}/ok", timeout=5)
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == "5"
