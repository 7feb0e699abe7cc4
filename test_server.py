"""Tests of the instrumented hello server, with real parts only.

Every test starts its own server on an ephemeral loopback port, in a thread,
with a fresh CollectorRegistry, and talks HTTP to it with http.client or a raw
socket. Randomness is pinned with failure_rate 0 or 1, max_delay 0, or a seed
whose draws the test computes. Nothing sleeps and hopes: waits are conditions
with a deadline, and no assertion is about how long something took.

The request metrics are recorded when the handler has finished the response,
which can be just after the client has read it; so a test that reads metrics
right after a response waits until all the exact values it expects hold at
once (expect_metrics), or reads until the server has closed the connection,
which it does only after recording the request.
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import http.client
import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

import conftest
import hello_server
from hello_server import Config, HelloHandler
from metrics import OTHER_PATH, OTHER_STATUS, HTTPMetrics, instrument

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
# prometheus_client's default buckets, which the server keeps (docs/metrics.md says why).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, float("inf"))
HELLO_OK = b"Hello!\n"
HELLO_ERROR = b"Error\n"
TEXT_PLAIN = "text/plain; charset=utf-8"


# --- helpers ------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll predicate until it is true; fail the test if the deadline passes first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.002)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def fetch(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Reply:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return Reply(resp.status, resp.headers, resp.read())


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send data on a new connection and read everything until the server closes it.

    The server closes its side only after it has recorded the request's metrics,
    so once this returns the metrics are final.
    """
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names, each at most once) and body of one raw response."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {raw[:200]!r}"
    status_line, *lines = head.decode("iso-8859-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"header {name} sent twice"
        headers[name.lower()] = value.strip()
    return int(status), headers, body


def exposition(text: str, parse: Callable[[str], Iterator] = text_string_to_metric_families) -> dict:
    """Every sample of an exposition, keyed by (name, frozenset of labels)."""
    samples: dict[tuple[str, frozenset], float] = {}
    for family in parse(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


def series(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def label_values(samples: dict, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for (n, labels) in samples if n == name}


class Running:
    """A server serving in a thread through hello_server.serve()."""

    def __init__(self, server: hello_server.HelloServer) -> None:
        self.server = server
        self.registry = server.registry
        self.stop_event = threading.Event()
        self.result: list[bool] = []
        self.thread = threading.Thread(target=self._serve, name="serve", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.result.append(hello_server.serve(self.server, self.stop_event))

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=10)

    def get(self, path: str, method: str = "GET", **kwargs) -> Reply:
        """One request on its own connection."""
        with contextlib.closing(self.connect()) as conn:
            return fetch(conn, method, path, **kwargs)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def scrape(self, path: str = "/metrics", headers: dict[str, str] | None = None) -> tuple[Reply, dict]:
        reply = self.get(path, headers=headers)
        assert reply.status == 200
        return reply, exposition(reply.body.decode())

    def stop(self) -> bool:
        """Set the stop event; return what serve() returned."""
        self.stop_event.set()
        # serve_forever() notices the shutdown between polls, every 0.5 s, or
        # as soon as a connection arrives: knock, so that the ~50 servers of
        # this file don't each wait for a poll. A refused knock is fine.
        deadline = time.monotonic() + 30
        while self.thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection((HOST, self.port), timeout=1).close()
            self.thread.join(timeout=0.05)
        assert not self.thread.is_alive(), "serve() did not return"
        return self.result[0]


StartServer = Callable[..., Running]


@pytest.fixture
def start() -> Iterator[StartServer]:
    """Start servers; every one is stopped at the end of the test, pass or fail.

    start(**config) serves make_server(config) with a fresh registry;
    default_collectors=True passes no registry, as main() does; handler=cls
    serves an instrumented subclass of HelloHandler instead of the real one.
    """
    running: list[Running] = []

    def _start(
        default_collectors: bool = False, handler: type[HelloHandler] | None = None, **overrides: object
    ) -> Running:
        settings: dict = {
            "host": HOST,
            "port": 0,
            "max_delay": 0.0,
            "failure_rate": 0.0,
            "access_log": False,
            "grace_period": 5.0,
        }
        settings.update(overrides)
        config = Config(**settings)
        registry = None if default_collectors else CollectorRegistry()
        if handler is None:
            server = hello_server.make_server(config, registry)
        else:
            assert registry is not None
            metrics = HTTPMetrics(registry, routes=hello_server.ROUTES)
            server = hello_server.HelloServer(config, instrument(handler, metrics), registry)
        running.append(Running(server))
        return running[-1]

    yield _start
    for r in running:
        r.stop()


@pytest.fixture
def server(start: StartServer) -> Running:
    return start()


def expect_metrics(r: Running, expected: list[tuple[str, dict[str, str], float | None]], timeout: float = 10) -> None:
    """Wait until every (name, labels, value) holds at once in the registry; fail with the differences.

    The counters of one response are updated one after the other, just after
    the client has the response: wait for all of them, not for one.
    """

    def actual() -> list:
        return [(name, labels, r.value(name, **labels)) for name, labels, _ in expected]

    deadline = time.monotonic() + timeout
    while (got := actual()) != expected and time.monotonic() < deadline:
        time.sleep(0.002)
    assert got == expected


def assert_hello_counts(r: Running, ok: int = 0, error: int = 0) -> None:
    """Exact /hello request, status and latency counts, and nothing anywhere else."""
    total = ok + error
    expect_metrics(
        r,
        [
            ("http_requests_total", {"path": "/hello"}, total),
            ("response_status_total", {"status": "200"}, ok),
            ("response_status_total", {"status": "500"}, error),
            ("http_response_time_seconds_count", {"path": "/hello"}, total),
            ("http_response_time_seconds_bucket", {"path": "/hello", "le": "+Inf"}, total),
            ("http_requests_total", {"path": OTHER_PATH}, 0),
            ("http_requests_in_flight", {}, 0),
        ],
    )


# --- /hello: counts, bodies, headers -----------------------------------------


@pytest.mark.parametrize(
    ("failure_rate", "status", "body"),
    [(0.0, 200, HELLO_OK), (1.0, 500, HELLO_ERROR)],
    ids=["success", "failure"],
)
def test_hello_counts_every_response_exactly(start: StartServer, failure_rate, status, body) -> None:
    r = start(failure_rate=failure_rate)
    n = 7
    with contextlib.closing(r.connect()) as conn:
        replies = [fetch(conn, "GET", "/hello") for _ in range(n)]
    for reply in replies:
        assert reply.status == status
        assert reply.body == body
        assert reply.headers["Content-Type"] == TEXT_PLAIN
        assert reply.headers["Content-Length"] == str(len(body))
    assert_hello_counts(r, **({"ok": n} if status == 200 else {"error": n}))

    # The same numbers through a real scrape of /metrics.
    _, samples = r.scrape()
    assert series(samples, "http_requests_total", path="/hello") == n
    assert series(samples, "http_requests_total", path=OTHER_PATH) == 0
    assert series(samples, "response_status_total", status=str(status)) == n
    assert series(samples, "response_status_total", status="500" if status == 200 else "200") == 0
    assert series(samples, "http_response_time_seconds_count", path="/hello") == n
    assert series(samples, "http_requests_in_flight") == 0


def test_hello_query_string_is_the_hello_route(server: Running) -> None:
    reply = server.get("/hello?name=x&y=1")
    assert (reply.status, reply.body) == (200, HELLO_OK)
    assert_hello_counts(server, ok=1)


def test_seeded_failures_match_what_clients_saw(start: StartServer) -> None:
    seed, n = 7, 50
    r = start(failure_rate=0.5, seed=seed)
    with contextlib.closing(r.connect()) as conn:
        statuses = [fetch(conn, "GET", "/hello").status for _ in range(n)]
    # max_delay 0 draws no delay: each request draws one random() for failure.
    rng = random.Random(seed)
    assert statuses == [500 if rng.random() < 0.5 else 200 for _ in range(n)]
    assert 0 < statuses.count(500) < n
    assert_hello_counts(r, ok=statuses.count(200), error=statuses.count(500))


# --- latency histogram --------------------------------------------------------


def test_controlled_delay_lands_in_its_bucket(start: StartServer) -> None:
    seed, max_delay = 10, 0.2
    # The server draws uniform(0, max_delay), sleeps it, then draws random().
    delay = random.Random(seed).uniform(0, max_delay)
    # Seed chosen so the delay sits just above the 0.1 bound, far below 0.25.
    assert 0.1 < delay < 0.12
    r = start(max_delay=max_delay, seed=seed)
    assert r.get("/hello").status == 200
    assert_hello_counts(r, ok=1)

    # time.sleep(delay) never returns early: every bound below the delay is
    # empty; the first bound above it (0.25) and all larger ones hold it.
    _, samples = r.scrape()
    for le in BUCKETS:
        expected = 1 if le >= delay else 0
        label = floatToGoString(le)
        assert r.value("http_response_time_seconds_bucket", path="/hello", le=label) == expected, le
        assert series(samples, "http_response_time_seconds_bucket", path="/hello", le=label) == expected, le
    assert r.value("http_response_time_seconds_sum", path="/hello") >= delay
    # No other route saw anything.
    assert r.value("http_response_time_seconds_count", path=OTHER_PATH) == 0


# --- concurrency --------------------------------------------------------------


def test_200_concurrent_requests_from_20_threads_are_counted_exactly(start: StartServer) -> None:
    threads, per_thread = 20, 10
    r = start(failure_rate=0.5, seed=3)
    barrier = threading.Barrier(threads)

    def client() -> list[int]:
        with contextlib.closing(r.connect()) as conn:
            conn.connect()
            sock = conn.sock
            barrier.wait(timeout=10)
            statuses = []
            for _ in range(per_thread):
                reply = fetch(conn, "GET", "/hello")
                assert reply.body == (HELLO_OK if reply.status == 200 else HELLO_ERROR)
                statuses.append(reply.status)
            assert conn.sock is sock, "the keep-alive connection was not reused"
            return statuses

    with ThreadPoolExecutor(threads) as pool:
        statuses = [s for result in pool.map(lambda _: client(), range(threads)) for s in result]
    assert len(statuses) == threads * per_thread
    assert set(statuses) <= {200, 500}
    assert_hello_counts(r, ok=statuses.count(200), error=statuses.count(500))


# --- statuses other than 200/500 ----------------------------------------------


def assert_counted_once(r: Running, path_label: str | None, status: int) -> None:
    """Exactly one request in the metrics, with this path label and status (None: nothing)."""
    _, samples = r.scrape()
    for source in (
        lambda name, **labels: r.value(name, **labels),
        lambda name, **labels: series(samples, name, **labels),
    ):
        for path in ("/hello", OTHER_PATH):
            expected = 1 if path == path_label else 0
            assert source("http_requests_total", path=path) == expected, path
            assert source("http_response_time_seconds_count", path=path) == expected, path
        assert source("http_requests_in_flight") == 0
    statuses = {dict(labels)["status"]: v for (n, labels), v in samples.items() if n == "response_status_total"}
    expected_statuses = {"200": 0, "500": 0}
    if path_label is not None:
        expected_statuses[str(status)] = 1
    assert statuses == expected_statuses
    assert label_values(samples, "http_requests_total", "path") == {"/hello", OTHER_PATH}


REJECTIONS = [
    # id, raw request, status, path label (None: /metrics, not counted)
    ("404-unknown-path", b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, OTHER_PATH),
    ("405-post-hello", b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 405, "/hello"),
    ("405-delete-hello", b"DELETE /hello HTTP/1.1\r\nHost: x\r\n\r\n", 405, "/hello"),
    ("404-post-unknown", b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404, OTHER_PATH),
    ("405-post-metrics", b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, None),
    ("400-space-in-path", b"GET /hello world HTTP/1.1\r\nHost: x\r\n\r\n", 400, OTHER_PATH),
    ("501-brew-hello", b"BREW /hello HTTP/1.1\r\nHost: x\r\n\r\n", 501, "/hello"),
    ("501-brew-pot", b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501, OTHER_PATH),
    ("501-brew-metrics", b"BREW /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 501, None),
    # The stdlib reads at most 65,537 bytes of request line; send exactly that
    # (no newline), so the server has nothing unread when it closes.
    ("414-long-line", b"GET /" + b"a" * (65537 - 5), 414, OTHER_PATH),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "path_label"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_rejections_are_answered_and_counted(server: Running, request_bytes, status, path_label) -> None:
    got, headers, body = split_response(raw_exchange(server.port, request_bytes))
    assert got == status
    assert headers["content-length"] == str(len(body))
    assert headers["connection"] == "close"
    if status == 405:
        assert headers["allow"] == "GET, HEAD"
    # The server closed the connection after recording the request.
    assert_counted_once(server, path_label, status)


def test_errors_after_a_request_on_the_same_connection_are_labelled_other(server: Running) -> None:
    """A bad request line says nothing of the path before it on a keep-alive connection."""
    hello = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = raw_exchange(server.port, hello + b"GET /a b HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\n\r\nHello!\nHTTP/1.1 400 " in raw
    raw = raw_exchange(server.port, hello + b"GET /" + b"a" * (65537 - 5))
    assert b"\r\n\r\nHello!\nHTTP/1.1 414 " in raw
    assert server.value("http_requests_total", path="/hello") == 2
    assert server.value("http_requests_total", path=OTHER_PATH) == 2
    assert server.value("response_status_total", status="200") == 2
    assert server.value("response_status_total", status="400") == 1
    assert server.value("response_status_total", status="414") == 1


# When the request line has no usable HTTP version, the stdlib answers the way
# HTTP/0.9 would: the HTML error page, without a status line or headers.
UNVERSIONED = [
    ("400-garbage", b"GARBAGE\r\n\r\n", 400),
    ("400-bad-version", b"GET /hello HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
    ("400-non-numeric-version", b"GET /hello HTTP/x.y\r\n\r\n", 400),
    ("400-http09-post", b"POST /hello\r\n\r\n", 400),
    ("505-http2", b"GET /hello HTTP/2.0\r\n\r\n", 505),
]


@pytest.mark.parametrize(("request_bytes", "status"), [r[1:] for r in UNVERSIONED], ids=[r[0] for r in UNVERSIONED])
def test_malformed_request_lines_get_the_stdlib_error_and_are_counted(server: Running, request_bytes, status) -> None:
    raw = raw_exchange(server.port, request_bytes)
    assert raw.startswith(b"<!DOCTYPE HTML>")
    assert f"<p>Error code: {status}</p>".encode() in raw
    assert_counted_once(server, OTHER_PATH, status)


def test_405_over_http_client_keeps_serving(server: Running) -> None:
    """POST /hello with a body, as curl -d sends it: 405 with Allow, then the server still answers."""
    reply = server.get("/hello", method="POST", body=b"x" * 1000)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"
    assert reply.body == b"Method Not Allowed\n"
    assert server.get("/hello").status == 200
    expect_metrics(
        server,
        [
            ("http_requests_total", {"path": "/hello"}, 2),
            ("response_status_total", {"status": "405"}, 1),
            ("response_status_total", {"status": "200"}, 1),
        ],
    )


def test_404_body_and_label(server: Running) -> None:
    reply = server.get("/nope?q=1")
    assert (reply.status, reply.body) == (404, b"Not Found\n")
    assert reply.headers["Content-Type"] == TEXT_PLAIN
    expect_metrics(
        server,
        [
            ("http_requests_total", {"path": OTHER_PATH}, 1),
            ("response_status_total", {"status": "404"}, 1),
            ("http_requests_total", {"path": "/hello"}, 0),
        ],
    )


class RaisingHandler(HelloHandler):
    """/hello?boom=... raises inside the handler, before or after send_response."""

    def _hello(self) -> None:
        if "boom=before" in self.path:
            raise RuntimeError("boom before the response")
        if "boom=after-status" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", TEXT_PLAIN)
            raise RuntimeError("boom after the status line")
        super()._hello()


@pytest.mark.parametrize("when", ["before", "after-status"])
def test_raising_handler_answers_500_and_is_counted(start: StartServer, capfd, when: str) -> None:
    r = start(handler=RaisingHandler)
    status, headers, body = split_response(
        raw_exchange(r.port, f"GET /hello?boom={when} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    )
    assert (status, body) == (500, b"Internal Server Error\n")
    assert headers["content-length"] == str(len(body))
    assert headers["connection"] == "close"
    # Counted once, with the status the client received (not the 200 the
    # handler had started).
    assert_counted_once(r, "/hello", 500)
    # A handler bug is a server error: its traceback is logged.
    assert f"RuntimeError: boom {'before the response' if when == 'before' else 'after the status line'}" in (
        capfd.readouterr().err
    )
    # And the server keeps serving.
    reply = r.get("/hello")
    assert (reply.status, reply.body) == (200, HELLO_OK)
    expect_metrics(
        r,
        [
            ("http_requests_total", {"path": "/hello"}, 2),
            ("response_status_total", {"status": "500"}, 1),
            ("response_status_total", {"status": "200"}, 1),
        ],
    )


def test_status_label_is_bounded_to_real_codes() -> None:
    registry = CollectorRegistry()
    m = HTTPMetrics(registry, routes=["/hello"])
    m.observe(OTHER_PATH, 999, 0.001)
    m.observe(OTHER_PATH, 418, 0.001)
    assert registry.get_sample_value("response_status_total", {"status": OTHER_STATUS}) == 1
    assert registry.get_sample_value("response_status_total", {"status": "418"}) == 1
    assert registry.get_sample_value("response_status_total", {"status": "999"}) is None


# --- bounded path label -------------------------------------------------------


def test_10000_random_paths_leave_a_handful_of_series(server: Running) -> None:
    rng = random.Random(42)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/%"
    near_misses = ["/hello/", "/HELLO", "/hello/x", "/hellox", "/metricsx", "/metrics/x", "/", "/hello%20"]
    paths = [
        rng.choice(near_misses) if i % 50 == 0 else "/" + "".join(rng.choices(alphabet, k=12)) for i in range(10_000)
    ]
    paths = [p + ("?q=" + str(i) if i % 3 == 0 else "") for i, p in enumerate(paths)]
    connections = 4

    def client(chunk: list[str]) -> list[int]:
        with contextlib.closing(server.connect()) as conn:
            return [fetch(conn, "GET", p).status for p in chunk]

    with ThreadPoolExecutor(connections) as pool:
        statuses = [s for part in pool.map(client, [paths[i::connections] for i in range(connections)]) for s in part]
    assert statuses == [404] * len(paths)
    expect_metrics(
        server,
        [
            ("http_requests_total", {"path": OTHER_PATH}, len(paths)),
            ("response_status_total", {"status": "404"}, len(paths)),
            ("http_response_time_seconds_count", {"path": OTHER_PATH}, len(paths)),
        ],
    )

    _, samples = server.scrape()
    assert label_values(samples, "http_requests_total", "path") == {"/hello", OTHER_PATH}
    assert label_values(samples, "http_response_time_seconds_count", "path") == {"/hello", OTHER_PATH}
    assert label_values(samples, "response_status_total", "status") == {"200", "404", "500"}
    assert series(samples, "response_status_total", status="404") == len(paths)
    assert series(samples, "http_requests_total", path="/hello") == 0
    assert len(samples) < 60  # the whole exposition stays small


# --- /metrics -----------------------------------------------------------------


def test_metrics_plain_text(server: Running) -> None:
    reply, samples = server.scrape()
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert "Content-Encoding" not in reply.headers
    text = reply.body.decode()
    assert "# TYPE http_requests_total counter" in text
    assert "# TYPE response_status_total counter" in text
    assert "# TYPE http_response_time_seconds histogram" in text
    assert "# TYPE http_requests_in_flight gauge" in text
    # The series the tutorial's PromQL needs exist from the first scrape.
    assert series(samples, "http_requests_total", path="/hello") == 0
    assert series(samples, "response_status_total", status="200") == 0
    assert series(samples, "response_status_total", status="500") == 0
    assert series(samples, "http_response_time_seconds_bucket", path="/hello", le="0.005") == 0
    assert not [name for name, _ in samples if name.endswith("_created")]
    assert "_created" not in text


def test_metrics_openmetrics_negotiation(server: Running) -> None:
    reply = server.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
    assert reply.headers["Content-Length"] == str(len(reply.body))
    text = reply.body.decode()
    assert text.endswith("# EOF\n")
    samples = exposition(text, parse_openmetrics)
    assert series(samples, "http_requests_total", path="/hello") == 0
    assert not [name for name, _ in samples if name.endswith("_created")]
    assert "_created" not in text


def test_metrics_gzip_negotiation(server: Running) -> None:
    assert server.get("/hello").status == 200
    assert_hello_counts(server, ok=1)
    reply = server.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert reply.status == 200
    assert reply.headers["Content-Encoding"] == "gzip"
    assert reply.headers["Content-Length"] == str(len(reply.body))
    samples = exposition(gzip.decompress(reply.body).decode())
    assert series(samples, "http_requests_total", path="/hello") == 1


def test_metrics_name_filter(server: Running) -> None:
    reply, samples = server.scrape("/metrics?name[]=http_requests_total&name[]=http_requests_in_flight")
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert {name for name, _ in samples} == {"http_requests_total", "http_requests_in_flight"}


def test_metrics_is_not_counted(server: Running) -> None:
    # All on one keep-alive connection, which one server thread serves in
    # order: the last scrape sees everything before it.
    with contextlib.closing(server.connect()) as conn:
        for _ in range(5):
            assert fetch(conn, "GET", "/metrics").status == 200
        assert fetch(conn, "HEAD", "/metrics").status == 200
        assert fetch(conn, "GET", "/metrics?name[]=http_requests_total").status == 200
        assert fetch(conn, "GET", "/hello").status == 200
        last = fetch(conn, "GET", "/metrics")
    samples = exposition(last.body.decode())
    assert label_values(samples, "http_requests_total", "path") == {"/hello", OTHER_PATH}
    assert series(samples, "http_requests_total", path="/hello") == 1
    assert series(samples, "http_requests_total", path=OTHER_PATH) == 0
    assert series(samples, "response_status_total", status="200") == 1
    assert server.value("http_requests_total", path="/metrics") is None


def test_default_collectors_without_a_registry(start: StartServer) -> None:
    r = start(default_collectors=True)
    _, samples = r.scrape()
    names = {name for name, _ in samples}
    assert "process_cpu_seconds_total" in names
    assert "python_info" in names
    assert "python_gc_objects_collected_total" in names
    assert "http_requests_total" in names
    assert not [name for name in names if name.endswith("_created")]


# --- HEAD ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "failure_rate"),
    [("/hello", 0.0), ("/hello", 1.0), ("/metrics", 0.0), ("/nope", 0.0)],
    ids=["hello-200", "hello-500", "metrics", "404"],
)
def test_head_is_get_without_a_body(start: StartServer, path: str, failure_rate: float) -> None:
    r = start(failure_rate=failure_rate)
    request = "{} " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    get_status, get_headers, get_body = split_response(raw_exchange(r.port, request.format("GET").encode()))
    head_status, head_headers, head_body = split_response(raw_exchange(r.port, request.format("HEAD").encode()))
    assert head_status == get_status
    assert head_headers["content-length"] == get_headers["content-length"] == str(len(get_body))
    assert head_headers["content-type"] == get_headers["content-type"]
    assert head_body == b""  # not a byte after the headers
    if path == "/hello":
        assert r.value("http_requests_total", path="/hello") == 2
        assert r.value("response_status_total", status=str(get_status)) == 2


def test_head_keeps_the_connection_usable(server: Running) -> None:
    with contextlib.closing(server.connect()) as conn:
        head = fetch(conn, "HEAD", "/hello")
        get = fetch(conn, "GET", "/hello")
    assert (head.status, head.body, head.headers["Content-Length"]) == (200, b"", "7")
    assert (get.status, get.body) == (200, HELLO_OK)
    assert_hello_counts(server, ok=2)


# --- keep-alive ---------------------------------------------------------------


def test_two_requests_on_one_keep_alive_connection(server: Running) -> None:
    with contextlib.closing(server.connect()) as conn:
        first = fetch(conn, "GET", "/hello")
        sock = conn.sock
        assert sock is not None, "the server closed the connection after the first response"
        second = fetch(conn, "GET", "/hello")
        assert conn.sock is sock, "the second request needed a new connection"
    for reply in (first, second):
        assert (reply.status, reply.body) == (200, HELLO_OK)
        assert reply.headers.get("Connection") is None
    assert_hello_counts(server, ok=2)  # includes http_requests_in_flight back to 0


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"GET /hello world HTTP/1.1\r\nHost: x\r\n\r\n"],
    ids=["200", "400-from-the-stdlib"],
)
def test_server_and_date_headers_are_sent_once_and_follow_the_clock(server: Running, request_bytes) -> None:
    """HelloHandler makes the Server and Date lines once a second: they must still be right."""
    version = f"{HelloHandler.server_version} {HelloHandler.sys_version}"
    # A line cached in an earlier second is never sent again.
    server.server.fixed_headers = (1, b"Server: stale\r\nDate: Thu, 01 Jan 1970 00:00:01 GMT\r\n")
    for _ in range(2):  # the second response may take the line the first one cached
        before = int(time.time())
        raw = raw_exchange(server.port, request_bytes)
        after = time.time()
        # Right after the status line, as the stdlib's send_response sends them.
        assert [line.split(b":")[0] for line in raw.split(b"\r\n")[1:3]] == [b"Server", b"Date"]
        _, headers, _ = split_response(raw)  # fails on a header sent twice
        assert headers["server"] == version
        assert before <= email.utils.parsedate_to_datetime(headers["date"]).timestamp() <= after


# --- clients that hang up -----------------------------------------------------


@pytest.mark.parametrize("hang_up", ["close", "reset"])
def test_client_hanging_up_during_the_delay(start: StartServer, capfd, hang_up: str) -> None:
    seed, max_delay = 0, 0.4
    assert random.Random(seed).uniform(0, max_delay) > 0.3  # time enough to hang up during it
    r = start(max_delay=max_delay, seed=seed)
    sock = socket.create_connection((HOST, r.port), timeout=10)
    sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: r.value("http_requests_in_flight") == 1, what="the request to be in flight")
    if hang_up == "reset":
        # SO_LINGER 0: close() sends RST, so the server's write fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()

    # Counted once, with the status the server sent (as Go's promhttp does).
    assert_hello_counts(r, ok=1)
    # The server keeps serving.
    reply = r.get("/hello")
    assert (reply.status, reply.body) == (200, HELLO_OK)
    assert_hello_counts(r, ok=2)
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert "Error" not in err


# --- graceful shutdown --------------------------------------------------------


def gated(gate: threading.Event, arrived: threading.Semaphore) -> type[HelloHandler]:
    """A HelloHandler whose /hello waits for gate: a delay the test controls."""

    class GatedHandler(HelloHandler):
        def _hello(self) -> None:
            arrived.release()
            assert gate.wait(timeout=30)
            super()._hello()

    return GatedHandler


def start_gated_requests(r: Running, k: int, arrived: threading.Semaphore, pool: ThreadPoolExecutor) -> list:
    futures = [pool.submit(r.get, "/hello") for _ in range(k)]
    # In the handler (so serve() counts them) and in the metrics' gauge.
    for _ in range(k):
        assert arrived.acquire(timeout=10)
    wait_until(lambda: r.value("http_requests_in_flight") == k)
    return futures


def test_graceful_shutdown_lets_requests_in_flight_finish(start: StartServer) -> None:
    k = 5
    gate, arrived = threading.Event(), threading.Semaphore(0)
    r = start(handler=gated(gate, arrived))
    with ThreadPoolExecutor(k) as pool:
        futures = start_gated_requests(r, k, arrived, pool)
        r.stop_event.set()
        # It stops accepting...
        wait_until(lambda: r.server.socket.fileno() == -1, what="the listening socket to close")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, r.port), timeout=5).close()
        # ...but waits for the requests in flight.
        assert r.thread.is_alive()
        gate.set()
        replies = [f.result(timeout=10) for f in futures]
    for reply in replies:
        assert (reply.status, reply.body) == (200, HELLO_OK)
        assert reply.headers["Connection"] == "close"
    assert r.stop() is True
    assert_hello_counts(r, ok=k)


def test_graceful_shutdown_gives_up_after_the_grace_period(start: StartServer) -> None:
    gate, arrived = threading.Event(), threading.Semaphore(0)
    r = start(handler=gated(gate, arrived), grace_period=0.2)
    with ThreadPoolExecutor(2) as pool:
        futures = start_gated_requests(r, 2, arrived, pool)
        assert r.stop() is False  # returned with the requests still in flight
        gate.set()
        replies = [f.result(timeout=10) for f in futures]
    assert [(x.status, x.headers["Connection"]) for x in replies] == [(200, "close")] * 2


def test_idle_keep_alive_connection_does_not_hold_up_shutdown(server: Running) -> None:
    with contextlib.closing(server.connect()) as conn:
        assert fetch(conn, "GET", "/hello").status == 200
        assert server.stop() is True  # while conn is still open and idle


# --- the real process ---------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This environment without HELLO_* variables, which would change the server's defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HELLO_")}


class Process:
    """python hello_server.py as a subprocess, its stderr read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "hello_server.py"), "--host", HOST, "--port", "0", *args],
            cwd=HERE,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        match = self.expect(r"hello_server: listening on http://([\d.]+):(\d+)")
        self.port = int(match.group(2))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """The first new stderr line matching pattern."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s; stderr: {self.stderr}") from None
            if line is None:
                raise AssertionError(f"stderr closed without {pattern!r}; stderr: {self.stderr}")
            self.stderr.append(line)
            if match := re.search(pattern, line):
                return match

    def wait(self, timeout: float = 15.0) -> int:
        code = self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=timeout)) is not None:
            self.stderr.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def process() -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def _start(*args: str) -> Process:
        started.append(Process(*args))
        return started[-1]

    yield _start
    for p in started:
        p.kill()


def test_process_serves_and_exits_0_on_sigterm(process) -> None:
    p = process("--max-delay", "0", "--failure-rate", "0")
    with contextlib.closing(http.client.HTTPConnection(HOST, p.port, timeout=10)) as conn:
        reply = fetch(conn, "GET", "/hello")
        assert (reply.status, reply.body) == (200, HELLO_OK)
        p.expect(r'method=GET path="/hello" status=200 ')
        # SIGTERM while this keep-alive connection is open and idle.
        p.proc.send_signal(signal.SIGTERM)
        assert p.wait() == 0
    assert p.stderr[-1] == "hello_server: stopped\n"
    assert "Traceback" not in "".join(p.stderr)


def test_process_sigterm_drains_a_request_in_flight(process) -> None:
    seed, max_delay = 17, 1.0
    assert random.Random(seed).uniform(0, max_delay) > 0.5
    p = process("--max-delay", str(max_delay), "--failure-rate", "0", "--seed", str(seed), "--access-log", "off")
    with ThreadPoolExecutor(1) as pool:
        slow_conn = http.client.HTTPConnection(HOST, p.port, timeout=10)
        slow = pool.submit(fetch, slow_conn, "GET", "/hello")

        def in_flight() -> bool:
            with contextlib.closing(http.client.HTTPConnection(HOST, p.port, timeout=10)) as conn:
                body = fetch(conn, "GET", "/metrics?name[]=http_requests_in_flight").body.decode()
            return series(exposition(body), "http_requests_in_flight") == 1

        wait_until(in_flight, what="the slow request to be in flight")
        p.proc.send_signal(signal.SIGTERM)
        reply = slow.result(timeout=10)
        slow_conn.close()
    assert (reply.status, reply.body) == (200, HELLO_OK)
    assert reply.headers["Connection"] == "close"
    assert p.wait() == 0
    assert p.stderr[-1] == "hello_server: stopped\n"


def run_server_to_exit(*args: str) -> subprocess.CompletedProcess[str]:
    """hello_server.py with args, for a start that must fail: its exit status and output."""
    return subprocess.run(
        [sys.executable, str(HERE / "hello_server.py"), *args],
        cwd=HERE,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_process_reports_a_busy_port(process) -> None:
    p = process("--access-log", "off")
    busy = run_server_to_exit("--host", HOST, "--port", str(p.port))
    assert busy.returncode == 1
    assert busy.stderr == (
        f"hello_server: cannot listen on {HOST}:{p.port}: port in use; "
        "pick another --port (HELLO_PORT) or stop what uses it\n"
    )
    p.proc.send_signal(signal.SIGINT)
    assert p.wait() == 0


@pytest.mark.parametrize(
    ("host", "message"),
    [
        # Not an IPv4 address, so looked up as a name, which does not exist.
        ("999.1.1.1", "cannot resolve --host '999.1.1.1'"),
        # TEST-NET-1 (RFC 5737): a valid address no machine here has.
        ("192.0.2.1", "cannot bind --host 192.0.2.1: not an address of this machine"),
    ],
)
def test_process_bad_host_is_a_bad_argument(host: str, message: str) -> None:
    bad = run_server_to_exit("--host", host, "--port", "0")
    assert bad.returncode == 2
    [line] = bad.stderr.splitlines()
    assert line.startswith(f"hello_server: {message}"), line
    # A host problem is not a port problem.
    assert "--port" not in line


# --- promtool -----------------------------------------------------------------


def test_promtool_accepts_a_live_scrape(start: StartServer) -> None:
    promtool = conftest.require_tool("promtool")
    r = start(default_collectors=True, failure_rate=0.5, seed=1)
    for path in ("/hello", "/hello", "/hello", "/nope"):
        r.get(path)
    expect_metrics(
        r, [("http_requests_total", {"path": "/hello"}, 3), ("http_requests_total", {"path": OTHER_PATH}, 1)]
    )
    reply, samples = r.scrape()
    assert series(samples, "http_requests_total", path="/hello") == 3
    check = subprocess.run([promtool, "check", "metrics"], input=reply.body, capture_output=True, timeout=30)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()


# --- configuration ------------------------------------------------------------


def test_config_defaults() -> None:
    config = hello_server.parse_args([], environ={})
    assert config == Config()
    assert config == Config(
        host="0.0.0.0", port=8080, max_delay=1.0, failure_rate=0.2, seed=None, access_log=True, grace_period=10.0
    )


ENV = {
    "HELLO_HOST": "127.0.0.1",
    "HELLO_PORT": "9000",
    "HELLO_MAX_DELAY": "0.5",
    "HELLO_FAILURE_RATE": "0",
    "HELLO_SEED": "42",
    "HELLO_ACCESS_LOG": "off",
    "HELLO_GRACE_PERIOD": "3",
}


def test_config_from_environment() -> None:
    assert hello_server.parse_args([], environ=ENV) == Config(
        host="127.0.0.1", port=9000, max_delay=0.5, failure_rate=0.0, seed=42, access_log=False, grace_period=3.0
    )


def test_config_flags_override_environment() -> None:
    argv = ["--host", "::1", "--port", "0", "--max-delay", "0", "--failure-rate", "1", "--seed", "7"]
    argv += ["--access-log", "on", "--grace-period", "0.5"]
    assert hello_server.parse_args(argv, environ=ENV) == Config(
        host="::1", port=0, max_delay=0.0, failure_rate=1.0, seed=7, access_log=True, grace_period=0.5
    )


def test_config_empty_environment_variable_means_unset() -> None:
    assert hello_server.parse_args([], environ={var: "" for var in ENV}) == Config()


@pytest.mark.parametrize(
    ("argv", "environ", "mention"),
    [
        (["--failure-rate", "2"], {}, "--failure-rate"),
        (["--failure-rate", "-0.1"], {}, "--failure-rate"),
        (["--port", "x"], {}, "--port"),
        (["--port", "65536"], {}, "--port"),
        (["--max-delay", "nan"], {}, "--max-delay"),
        (["--max-delay", "inf"], {}, "--max-delay"),
        (["--seed", "x"], {}, "--seed"),
        (["--access-log", "maybe"], {}, "--access-log"),
        (["--no-such-flag"], {}, "--no-such-flag"),
        ([], {"HELLO_MAX_DELAY": "-1"}, "HELLO_MAX_DELAY"),
        ([], {"HELLO_PORT": "http"}, "HELLO_PORT"),
        ([], {"HELLO_FAILURE_RATE": "20%"}, "HELLO_FAILURE_RATE"),
        ([], {"HELLO_GRACE_PERIOD": "nan"}, "HELLO_GRACE_PERIOD"),
    ],
)
def test_config_invalid_values_exit_2(capsys, argv: list[str], environ: dict[str, str], mention: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        hello_server.parse_args(argv, environ=environ)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert mention in err, err


# --- access log ---------------------------------------------------------------

LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_logfmt(line: str) -> dict[str, str]:
    fields = dict(LOGFMT.findall(line))
    assert " ".join(f"{k}={v}" for k, v in fields.items()) == line, f"not plain logfmt: {line!r}"
    return fields


def test_access_log_one_logfmt_line_per_request(start: StartServer, capfd) -> None:
    r = start(access_log=True)
    with contextlib.closing(r.connect()) as conn:
        assert fetch(conn, "GET", "/hello").status == 200
        assert fetch(conn, "HEAD", "/hello?x=1").status == 200
        assert fetch(conn, "GET", '/x"y').status == 404
        assert fetch(conn, "GET", "/metrics").status == 200
    raw_exchange(r.port, b"GARBAGE\r\n\r\n")
    # Two requests on one connection, the second with an over-long request
    # line: its line must not carry the first request's path.
    raw_exchange(r.port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /" + b"a" * (65537 - 5))

    expected = [
        ("GET", "/hello", "200"),
        ("HEAD", "/hello?x=1", "200"),
        ("GET", '/x"y', "404"),
        ("GET", "/metrics", "200"),
        ("-", None, "400"),
        ("GET", "/hello", "200"),
        ("-", None, "414"),
    ]
    out: list[str] = []

    def logged() -> bool:
        out.extend(capfd.readouterr().err.splitlines())
        return len(out) >= len(expected)

    wait_until(logged, what="the access log lines")
    assert len(out) == len(expected), out
    for line, (method, path, status) in zip(out, expected, strict=True):
        fields = parse_logfmt(line)
        assert list(fields) == ["ts", "client", "method", "path", "status", "duration", "trace_id"]
        assert fields["client"] == HOST
        assert fields["method"] == method, line
        assert (fields["path"] == "-") if path is None else (json.loads(fields["path"]) == path), line
        assert fields["status"] == status, line
        assert float(fields["duration"]) >= 0
        assert re.fullmatch("[0-9a-f]{32}", fields["trace_id"]), line


def test_access_log_off_is_silent(server: Running, capfd) -> None:
    with contextlib.closing(server.connect()) as conn:
        assert fetch(conn, "GET", "/hello").status == 200
        assert fetch(conn, "GET", "/nope").status == 404
        assert fetch(conn, "GET", "/metrics").status == 200
    raw_exchange(server.port, b"GARBAGE\r\n\r\n")
    raw_exchange(server.port, b"BREW /hello HTTP/1.1\r\n\r\n")
    expect_metrics(server, [("http_requests_total", {"path": "/hello"}, 2)])
    assert capfd.readouterr().err == ""
