"""Request ids and exemplars: from a latency bucket to the request that filled it.

Every request the server answers gets an id (a valid incoming traceparent's
trace id, else a new one), sent back in X-Request-Id and written in its
access-log line; each latency bucket carries the latest request's id, value
and time as an exemplar in the OpenMetrics exposition, never in plain text.
The end-to-end test runs the real program and a real Prometheus
(stack.native_stack) and follows exemplars from /api/v1/query_exemplars back
to the access log.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Exemplar

import check_dashboards
import promapi
import stack
from conftest import require_tool
from hello_server import ROUTES, Config, make_server
from metrics import BUCKETS, REQUEST_ID_HEADER, HTTPMetrics, new_trace_id, parse_traceparent

HOST = "127.0.0.1"
HISTOGRAM = "http_response_time_seconds"
OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}
ID = re.compile(r"[0-9a-f]{32}")
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


# --- parsing traceparent --------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        VALID,
        f"00-{TRACE}-{PARENT}-00",  # not sampled: still the caller's trace
        f"  {VALID}\t",  # optional whitespace around a header value
        f"01-{TRACE}-{PARENT}-01",  # a later version, read by its version-00 prefix
        f"cc-{TRACE}-{PARENT}-09-what-the-future-adds",
    ],
)
def test_a_valid_traceparent_gives_its_trace_id(value):
    assert parse_traceparent(value) == TRACE


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 is exactly 55 characters
        f"00-{TRACE}-{PARENT}-01-",
        f"01-{TRACE}-{PARENT}-01x",  # a later version's extra fields follow a dash
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{PARENT}-01",  # lower-case hex only
        f"0g-{TRACE}-{PARENT}-01",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-{TRACE}x-{PARENT}-01",
        f"00_{TRACE}_{PARENT}_01",
        f"00-{TRACE}-{PARENT}-1",
        f"00-{TRACE}-{PARENT}-0z",
        f'00-{TRACE}-{PARENT}-01"',
        f"00-{TRACE}-{PARENT}-01\r\n trace_id=forged",
        "a" * 10240,
    ],
)
def test_an_invalid_traceparent_gives_nothing(value):
    assert parse_traceparent(value) is None


def test_new_ids_are_distinct_and_shaped_like_trace_ids():
    ids = {new_trace_id() for _ in range(10000)}
    assert len(ids) == 10000
    assert all(ID.fullmatch(i) for i in ids)


def test_a_forked_child_does_not_repeat_its_parents_ids():
    # Pre-forking servers fork after import: without a reseed the child's
    # first id would be the parent's next one.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_trace_id().encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    assert ID.fullmatch(child)
    assert child != new_trace_id()


# --- the collector: exact exemplars --------------------------------------------


def histogram(registry: CollectorRegistry) -> dict[tuple[str, str], tuple[float, Exemplar | None]]:
    """(path, le) -> (cumulative count, exemplar), from the OpenMetrics exposition."""
    text = generate_openmetrics(registry).decode()
    return {
        (s.labels["path"], s.labels["le"]): (s.value, s.exemplar)
        for family in parse_openmetrics(text)
        if family.name == HISTOGRAM
        for s in family.samples
        if s.name == HISTOGRAM + "_bucket"
    }


def test_each_bucket_carries_its_latest_request():
    registry = CollectorRegistry()
    m = HTTPMetrics(registry, routes=ROUTES)
    before = time.time()
    m.observe("/hello", 200, 0.003, "a" * 32)  # bucket 0.005
    m.observe("/hello", 500, 0.004, "b" * 32)  # bucket 0.005, later: replaces a
    m.observe("/hello", 200, 0.3, "c" * 32)  # bucket 0.5
    m.observe("/hello", 200, 0.5, "d" * 32)  # 0.5 exactly is still the 0.5 bucket
    m.observe("/hello", 200, 12.0, "e" * 32)  # beyond 10 s: +Inf
    m.observe("/hello", 200, 0.04)  # no id: counted, no exemplar
    m.observe("other", 404, 0.001, "f" * 32)
    after = time.time()

    buckets = histogram(registry)
    with_exemplar = {key: e for key, (_, e) in buckets.items() if e is not None}
    assert {key: (e.labels, e.value) for key, e in with_exemplar.items()} == {
        ("/hello", "0.005"): ({"trace_id": "b" * 32}, 0.004),
        ("/hello", "0.5"): ({"trace_id": "d" * 32}, 0.5),
        ("/hello", "+Inf"): ({"trace_id": "e" * 32}, 12.0),
        ("other", "0.005"): ({"trace_id": "f" * 32}, 0.001),
    }
    for e in with_exemplar.values():
        assert before <= float(e.timestamp) <= after
    # The counts are what they were without exemplars.
    assert buckets[("/hello", "0.005")][0] == 2
    assert buckets[("/hello", "0.05")][0] == 3
    assert buckets[("/hello", "+Inf")][0] == 6


def test_plain_text_is_byte_identical_with_and_without_exemplars():
    observations = [("/hello", 200, 0.003), ("/hello", 500, 0.3), ("other", 404, 0.02), ("/hello", 200, 11.0)]
    with_ids, without = CollectorRegistry(), CollectorRegistry()
    a, b = HTTPMetrics(with_ids, routes=ROUTES), HTTPMetrics(without, routes=ROUTES)
    for path, status, seconds in observations:
        a.observe(path, status, seconds, new_trace_id())
        b.observe(path, status, seconds)
    assert generate_latest(with_ids) == generate_latest(without)
    assert b"trace_id" not in generate_latest(with_ids)
    # OpenMetrics differs only by the exemplars appended to bucket lines.
    stripped = re.sub(rb" # \{trace_id=\"[0-9a-f]{32}\"\} \S+ \S+", b"", generate_openmetrics(with_ids))
    assert stripped == generate_openmetrics(without)
    assert generate_openmetrics(with_ids).count(b"trace_id") == 4


# --- the server -------------------------------------------------------------------


@dataclass
class Sent:
    """What a client saw of one request."""

    status: int
    request_id: str
    traceparent: str | None = None


@dataclass
class App:
    """A hello server serving in a thread, its access log captured by pytest's capfd."""

    server: object
    port: int
    capfd: pytest.CaptureFixture[str]
    log: list[str] = field(default_factory=list)

    def get(self, path: str = "/hello", headers: dict[str, str] | None = None) -> Sent:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            response.read()
            return Sent(response.status, response.getheader(REQUEST_ID_HEADER), (headers or {}).get("traceparent"))
        finally:
            conn.close()

    def raw(self, request: bytes) -> bytes:
        """Send bytes on a new connection; everything the server answers until it closes."""
        with socket.create_connection((HOST, self.port), timeout=10) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def scrape(self, headers: dict[str, str] | None = None) -> str:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", "/metrics", headers=headers or {})
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def wait_counted(self, count: int, path: str = "/hello") -> None:
        """Wait until count responses to path are recorded: that happens just after the client has them."""
        registry = self.server.registry  # type: ignore[attr-defined]

        def counted() -> bool:
            return registry.get_sample_value(HISTOGRAM + "_count", {"path": path}) == count

        stack.wait_until(counted, 10, f"{count} responses to {path} in the histogram")

    def log_lines(self, count: int, timeout: float = 10.0) -> list[str]:
        """The first count access-log lines, once they are all written."""
        stack.wait_until(lambda: self._read() >= count, timeout, f"{count} access-log lines")
        return self.log[:count]

    def _read(self) -> int:
        self.log.extend(self.capfd.readouterr().err.splitlines())
        return len(self.log)


@contextmanager
def serving(capfd: pytest.CaptureFixture[str], **overrides: object) -> Iterator[App]:
    """A hello server with the access log on, serving in a thread until the block ends."""
    # Delays up to 0.2 s spread requests over the buckets from 5 ms to 250 ms.
    settings: dict = {"host": HOST, "port": 0, "max_delay": 0.2, "failure_rate": 0.2, "access_log": True}
    server = make_server(Config(**(settings | overrides)), CollectorRegistry())
    thread = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    thread.start()
    try:
        yield App(server, server.server_address[1], capfd)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def app(capfd) -> Iterator[App]:
    with serving(capfd) as running:
        yield running


def logfmt(line: str) -> dict[str, str]:
    fields = dict(LOGFMT.findall(line))
    assert " ".join(f"{k}={v}" for k, v in fields.items()) == line, f"not plain logfmt: {line!r}"
    return fields


def bucket_bounds(le: str) -> tuple[float, float]:
    """(lower, upper] of the bucket whose upper bound is le, as the histogram counts it."""
    upper = float(le)
    index = BUCKETS.index(upper)
    return (BUCKETS[index - 1] if index else 0.0), upper


def test_every_exemplar_is_a_request_this_test_sent(app):
    before = time.time()
    traced = {f"{i:032x}": f"00-{i:032x}-{PARENT}-01" for i in range(1, 11)}
    headers = [{}] * 50 + [{"traceparent": tp} for tp in traced.values()]
    with ThreadPoolExecutor(max_workers=6) as pool:
        sent = list(pool.map(lambda h: app.get("/hello", h), headers))
    app.wait_counted(len(sent))
    after = time.time()

    ids = [s.request_id for s in sent]
    assert all(ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(sent)
    # A valid traceparent's trace id is the request's id.
    assert {s.request_id for s in sent if s.traceparent} == set(traced)
    logged = {logfmt(line)["trace_id"]: logfmt(line) for line in app.log_lines(len(sent))}
    assert set(logged) == set(ids)
    for s in sent:
        assert logged[s.request_id]["status"] == str(s.status)

    text = app.scrape(OPENMETRICS)
    exemplars = 0
    previous = 0.0
    for family in parse_openmetrics(text):
        if family.name != HISTOGRAM:
            continue
        for sample in family.samples:
            if sample.name != HISTOGRAM + "_bucket" or sample.labels["path"] != "/hello":
                continue
            # A bucket holds an exemplar exactly when a request landed in it.
            landed = sample.value - previous
            previous = sample.value
            assert (sample.exemplar is not None) == (landed > 0), sample
            if sample.exemplar is None:
                continue
            exemplars += 1
            trace_id = sample.exemplar.labels["trace_id"]
            assert sample.exemplar.labels == {"trace_id": trace_id}
            assert trace_id in ids
            assert logged[trace_id]["path"] == '"/hello"'
            lower, upper = bucket_bounds(sample.labels["le"])
            assert lower < sample.exemplar.value <= upper, sample
            assert before <= float(sample.exemplar.timestamp) <= after
    assert previous == len(sent)
    # 0-200 ms spreads 60 requests over at least four buckets.
    assert exemplars >= 4


def test_the_plain_text_exposition_has_no_exemplars_and_passes_promtool(app):
    promtool = require_tool("promtool")
    for _ in range(5):
        app.get("/hello", {"traceparent": VALID})
    app.get("/nowhere")
    app.wait_counted(5)
    plain = app.scrape()
    assert "trace_id" not in plain and TRACE not in plain
    assert "# {" not in plain
    names = {s.name for family in parse_text(plain) for s in family.samples}
    assert {HISTOGRAM + "_bucket", HISTOGRAM + "_sum", HISTOGRAM + "_count"} <= names
    check = subprocess.run([promtool, "check", "metrics"], input=plain.encode(), capture_output=True, timeout=30)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    # The same scrape in OpenMetrics carries the caller's trace id.
    assert f'# {{trace_id="{TRACE}"}}' in app.scrape(OPENMETRICS)


def test_a_malformed_traceparent_is_replaced(app):
    malformed = [
        f"ff-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-01-extra",
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        "garbage",
    ]
    sent = [app.get("/hello", {"traceparent": value}) for value in malformed]
    ids = [s.request_id for s in sent]
    assert all(ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert TRACE not in ids
    assert [logfmt(line)["trace_id"] for line in app.log_lines(len(sent))] == ids


def test_two_traceparent_headers_are_replaced(app):
    other = f"00-{'1' * 32}-{PARENT}-01"
    reply = app.raw(
        f"GET /hello HTTP/1.1\r\nHost: x\r\ntraceparent: {VALID}\r\ntraceparent: {other}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    [request_id] = re.findall(rb"X-Request-Id: (\S+)\r\n", reply)
    assert ID.fullmatch(request_id.decode()) and request_id.decode() not in (TRACE, "1" * 32)
    assert logfmt(app.log_lines(1)[0])["trace_id"] == request_id.decode()


HOSTILE_MARK = "FORGED"
HOSTILE = [
    # Header folding puts a CR LF inside the value: a log line forged after it.
    f'{VALID}\r\n ts=x status=200 trace_id="{HOSTILE_MARK}"',
    f'00-{TRACE}-{PARENT}-01" {HOSTILE_MARK}="',
    f"\"{HOSTILE_MARK}\" '{HOSTILE_MARK}'",
    HOSTILE_MARK + "x" * 10240,
    # A later version may add fields: only its 32 hex digits are kept.
    f"01-{'2' * 32}-{PARENT}-01-{HOSTILE_MARK}\r\n\t{HOSTILE_MARK}",
]


def test_a_hostile_traceparent_never_reaches_the_log_or_the_exposition(app):
    ids = []
    for value in HOSTILE:
        reply = app.raw(f"GET /hello HTTP/1.1\r\nHost: x\r\ntraceparent: {value}\r\nConnection: close\r\n\r\n".encode())
        assert reply.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 500 ")), reply[:200]
        [request_id] = re.findall(rb"X-Request-Id: (\S+)\r\n", reply)
        ids.append(request_id.decode())
    assert all(ID.fullmatch(i) for i in ids)
    # Only the later version's well-formed trace id is kept; the rest are new.
    assert ids[-1] == "2" * 32
    assert TRACE not in ids and len(set(ids)) == len(ids)

    # One line per request, nothing forged, each with the id its client was told.
    lines = app.log_lines(len(HOSTILE))
    assert [logfmt(line)["trace_id"] for line in lines] == ids
    for text in (app.scrape(), app.scrape(OPENMETRICS)):
        assert HOSTILE_MARK not in text
        assert set(re.findall(r'trace_id="([^"]*)"', text)) <= set(ids)
    log = app.log_lines(len(HOSTILE) + 2)
    assert not any(HOSTILE_MARK in line for line in log)
    assert [logfmt(line)["path"] for line in log[-2:]] == ['"/metrics"', '"/metrics"']


def test_the_stdlibs_own_errors_get_an_id_too(app):
    requests = {
        "414": b"GET /" + b"a" * 65537 + b" HTTP/1.1\r\n\r\n",
        "431": b"GET /hello HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",
        "501": b"BREW /hello HTTP/1.1\r\nConnection: close\r\n\r\n",
    }
    ids = []
    for status, request in requests.items():
        reply = app.raw(request)
        assert reply.split(b" ", 2)[1] == status.encode(), reply[:100]
        [request_id] = re.findall(rb"X-Request-Id: (\S+)\r\n", reply)
        ids.append(request_id.decode())
    # A request line without a version is HTTP/0.9: its answer has no headers
    # to carry the id, but the log line has one.
    assert b"X-Request-Id" not in app.raw(b"GARBAGE\r\n\r\n")
    lines = [logfmt(line) for line in app.log_lines(len(requests) + 1)]
    assert [line["status"] for line in lines] == [*requests, "400"]
    assert [line["trace_id"] for line in lines[:-1]] == ids
    assert ID.fullmatch(lines[-1]["trace_id"])


def test_a_503_at_the_connection_limit_has_no_id_and_replaces_no_exemplar(capfd):
    # The lobby answers it before any handler runs: no id, no log line, so it
    # must not take the exemplar of its bucket from a request that has both.
    with serving(capfd, max_delay=0.0, failure_rate=0.0, max_connections=1, idle_timeout=60) as app:
        with socket.create_connection((HOST, app.port), timeout=10) as held:
            held.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"Hello!" not in head:
                head += held.recv(65536)
            [served] = re.findall(rb"X-Request-Id: (\S+)\r\n", head)
            refused = app.raw(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert refused.startswith(b"HTTP/1.1 503 ") and b"X-Request-Id" not in refused
            app.wait_counted(2)
            text = app.scrape(OPENMETRICS)
        buckets = [s for f in parse_openmetrics(text) if f.name == HISTOGRAM for s in f.samples]
        hello = {s.labels["le"]: s for s in buckets if s.labels.get("path") == "/hello" and "le" in s.labels}
        # Both counted; one exemplar, the served request's, whichever buckets they fell in.
        assert hello["+Inf"].value == 2
        assert [s.exemplar.labels for s in hello.values() if s.exemplar] == [{"trace_id": served.decode()}]
        lines = [logfmt(line) for line in app.log_lines(2)]
        assert [(line["path"], line["trace_id"]) for line in lines] == [
            ('"/hello"', served.decode()),
            ('"/metrics"', lines[1]["trace_id"]),
        ]


# --- end to end: Prometheus stores them, the log has them --------------------------

DASHBOARD = json.loads((check_dashboards.DASHBOARDS / "hello.json").read_text())
EXEMPLAR_QUERIES = [
    (f"panel {panel['title']!r} query {target['refId']}", check_dashboards.promql(target["expr"]))
    for panel in check_dashboards.panels(DASHBOARD)
    for target in panel.get("targets", [])
    if target.get("exemplar")
]


def test_prometheus_stores_exemplars_whose_ids_are_in_the_access_log():
    require_tool("prometheus")
    app_args = ["--access-log", "on", "--max-delay", "0.2"]
    with stack.native_stack(app_args=app_args, scrape_interval="1s", evaluation_interval="1s") as live:
        live.wait_for_scrape(timeout=30)
        start = time.time()
        host, port = live.app_url.removeprefix("http://").rsplit(":", 1)
        received: set[str] = set()
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            # ~4 s of requests at 0-200 ms each; the last one is the latest in
            # its bucket, so the caller's trace id must reach Prometheus.
            for headers in [{}] * 40 + [{"traceparent": VALID}]:
                conn.request("GET", "/hello", headers=headers)
                response = conn.getresponse()
                response.read()
                received.add(response.getheader(REQUEST_ID_HEADER))
        finally:
            conn.close()
        assert TRACE in received and len(received) == 41

        expr = f'{HISTOGRAM}_bucket{{job="hello", path="/hello"}}'
        # A scrape stores samples and exemplars together: once one has seen
        # every request, the exemplars of every bucket a request landed in are stored.
        stack.wait_until(
            lambda: promapi.query(live.prometheus_url, f'{expr[:-1]}, le="+Inf"}} == {len(received)}'),
            30,
            f"Prometheus to scrape all {len(received)} requests",
        )
        buckets = promapi.query(live.prometheus_url, expr)
        series = promapi.query_exemplars(live.prometheus_url, expr, start - 1, time.time() + 1)
        # Grafana asks for a panel's exemplars with the query itself: each one that
        # draws them must find these.
        assert len(EXEMPLAR_QUERIES) == 2
        for where, query in EXEMPLAR_QUERIES:
            found = promapi.query_exemplars(live.prometheus_url, query, start - 1, time.time() + 1)
            assert {e["labels"]["trace_id"] for entry in found for e in entry["exemplars"]} <= received, where
            assert found, f"{where}: no exemplars for {query}"
        log = (live.workdir / "app.log").read_text()

    cumulative = sorted((float(b["metric"]["le"]), float(b["value"][1])) for b in buckets)
    landed = {le for (le, n), (_, below) in zip(cumulative, [(0.0, 0.0), *cumulative[:-1]], strict=True) if n > below}
    assert {float(entry["seriesLabels"]["le"]) for entry in series} == landed

    logged = {logfmt(line)["trace_id"] for line in log.splitlines() if line.startswith("ts=")}
    assert TRACE in {e["labels"]["trace_id"] for entry in series for e in entry["exemplars"]}
    seen = 0
    for entry in series:
        lower, upper = bucket_bounds(entry["seriesLabels"]["le"])
        for exemplar in entry["exemplars"]:
            trace_id = exemplar["labels"]["trace_id"]
            assert trace_id in received, exemplar
            assert trace_id in logged, exemplar
            assert lower < float(exemplar["value"]) <= upper, (entry["seriesLabels"], exemplar)
            assert start - 1 <= exemplar["timestamp"] <= time.time()
            seen += 1
    assert seen >= 2
