"""Impolite clients: deadlines, the connection cap, the drain, a fuzzed parser, and their metrics.

Real servers on loopback with small deadlines and caps (Config), real sockets.
Closes are detected by the client reading end of file; the only timings
asserted are the deadlines the server promises (a lower bound it must not
undercut, and the deadline plus a margin it must not overrun).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import audit
import hello_server
import traffic
from connections import REASONS, SCRAPE_THREADS
from hello_server import Config, HelloHandler
from metrics import HTTPMetrics, instrument
from test_server import (
    HELLO_OK,
    Running,
    expect_metrics,
    fetch,
    gated,
    process,  # noqa: F401  (the fixture: python hello_server.py in a subprocess)
    split_response,
    wait_until,
)

HOST = "127.0.0.1"
# How late a deadline's close may come on a busy machine. Generous: the
# trickling clients below would keep a per-recv timeout at bay for minutes.
MARGIN = 2.0
REQUEST = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def start() -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def _start(handler: type[HelloHandler] | None = None, **overrides: object) -> Running:
        settings_: dict = {"host": HOST, "port": 0, "max_delay": 0.0, "failure_rate": 0.0, "access_log": False}
        settings_.update(overrides)
        config, registry = Config(**settings_), CollectorRegistry()
        if handler is None:
            server = hello_server.make_server(config, registry)
        else:
            server = hello_server.HelloServer(
                config, instrument(handler, HTTPMetrics(registry, hello_server.ROUTES)), registry
            )
        running.append(Running(server))
        return running[-1]

    yield _start
    for r in running:
        r.stop()


def closed(**counts: int) -> list[tuple[str, dict[str, str], float]]:
    """expect_metrics entries: http_connections_closed_total for every reason (0 unless given)."""
    return [("http_connections_closed_total", {"reason": reason}, counts.get(reason, 0)) for reason in REASONS]


def connect(r: Running) -> socket.socket:
    return socket.create_connection((HOST, r.port), timeout=10)


def wait_closed(sock: socket.socket) -> float:
    """Read (and drop) until the server closes; the monotonic time it did."""
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(65536):
            pass
    return time.monotonic()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body, read from a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    status, headers, body = split_response(data)
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return status, headers, body


def hold(r: Running) -> socket.socket:
    """A keep-alive connection that has been served, and so holds a slot."""
    sock = connect(r)
    sock.sendall(REQUEST)
    assert read_response(sock)[0] == 200
    return sock


# --- deadlines ----------------------------------------------------------------


def test_silent_and_trickling_clients_are_closed_at_the_header_deadline(start) -> None:
    deadline = 1.0
    r = start(header_timeout=deadline)
    began = time.monotonic()
    silent = [connect(r) for _ in range(20)]
    trickling = [connect(r) for _ in range(5)]
    head = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 1000
    ended: dict[socket.socket, float] = {}
    stop = threading.Event()

    def trickle() -> None:
        # One byte a tenth of a second to each: a per-recv timeout would never fire.
        for i in range(len(head)):
            for s in trickling:
                if s not in ended:
                    with contextlib.suppress(OSError):
                        s.send(head[i : i + 1])
            if stop.wait(0.1):
                return

    def watch(s: socket.socket) -> None:
        ended[s] = wait_closed(s)

    with ThreadPoolExecutor(len(trickling) + 1) as pool:
        pool.submit(trickle)
        watchers = [pool.submit(watch, s) for s in trickling]
        # A polite client is served beside them, before any deadline.
        reply = r.get("/hello")
        assert (reply.status, reply.body) == (200, HELLO_OK)
        for s in silent:
            ended[s] = wait_closed(s)
        for w in watchers:
            w.result(timeout=deadline + 10)
        stop.set()
    for s in silent + trickling:
        s.close()
    served = time.monotonic()
    # Silent and trickling alike: none closed before its deadline, none long after.
    assert len(ended) == len(silent) + len(trickling)
    assert all(deadline <= t - began < deadline + MARGIN for t in ended.values()), [t - began for t in ended.values()]
    assert served - began >= deadline
    expect_metrics(
        r,
        [
            *closed(header_timeout=25, normal=1),
            ("http_connections_accepted_total", {}, 26),
            ("http_connections_open", {}, 0),
            ("http_requests_total", {"path": "/hello"}, 1),
            ("response_status_total", {"status": "200"}, 1),
            ("http_requests_total", {"path": "other"}, 0),
        ],
    )


def test_the_header_deadline_of_a_keep_alive_request_starts_at_its_first_byte(start) -> None:
    deadline = 0.5
    r = start(header_timeout=deadline, idle_timeout=30)
    with connect(r) as sock:
        sock.sendall(REQUEST)
        assert read_response(sock)[0] == 200
        # Idle longer than the header deadline: only the idle timeout applies...
        time.sleep(deadline * 2)
        sock.sendall(b"GET /hel")
        began = time.monotonic()
        # ...and from the first byte, the head is due in `deadline`.
        ended = wait_closed(sock)
    assert deadline <= ended - began + 0.01 < deadline + MARGIN
    expect_metrics(r, [*closed(header_timeout=1), ("http_requests_total", {"path": "/hello"}, 1)])


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(start) -> None:
    idle = 0.5
    r = start(idle_timeout=idle)
    with connect(r) as sock:
        for _ in range(2):  # kept alive between requests sent in time
            sock.sendall(REQUEST)
            status, headers, _ = read_response(sock)
            assert status == 200
            assert "connection" not in headers
        began = time.monotonic()
        ended = wait_closed(sock)
    assert idle - 0.01 <= ended - began < idle + MARGIN
    expect_metrics(
        r,
        [
            *closed(idle_timeout=1),
            ("http_requests_total", {"path": "/hello"}, 2),
            ("http_connections_accepted_total", {}, 1),
            ("http_connections_open", {}, 0),
        ],
    )


def test_a_client_that_reads_nothing_is_closed_at_the_write_timeout(start) -> None:
    r = start(write_timeout=0.5, idle_timeout=60)
    sock = socket.socket()
    # A small receive window: the server's writes block soon.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((HOST, r.port))
    with sock:
        # Pipelined requests, their responses never read, until the server gives up.
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 100
        with contextlib.suppress(OSError):
            for _ in range(200):
                sock.sendall(request)
                if r.value("http_connections_closed_total", reason="write_timeout"):
                    break
        expect_metrics(r, [*closed(write_timeout=1), ("http_connections_open", {}, 0)])
    # The server carries on.
    assert r.get("/hello").status == 200


# --- the connection cap -------------------------------------------------------


def test_a_flood_past_the_cap_gets_503s_each_counted_once(start) -> None:
    cap, flood = 5, 60
    r = start(max_connections=cap, idle_timeout=60)
    held = [hold(r) for _ in range(cap)]
    expect_metrics(r, [("http_connections_open", {}, cap)])

    def refused(path: str) -> tuple[int, dict[str, str], bytes]:
        with connect(r) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return split_response(data)

    paths = ["/hello"] * (flood - 5) + ["/nope"] * 5
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(refused, paths))
    for status, headers, body in replies:
        assert status == 503
        assert headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        assert headers["content-length"] == str(len(body))
        assert headers["date"].endswith(" GMT")
    expect_metrics(
        r,
        [
            ("http_requests_refused_total", {}, flood),
            # Each route's 503s under its own label, as the audit compares them.
            ("response_status_total", {"status": "503"}, flood),
            ("http_requests_total", {"path": "/hello"}, cap + flood - 5),
            ("http_response_time_seconds_count", {"path": "/hello"}, cap + flood - 5),
            ("http_requests_total", {"path": "other"}, 5),
            ("response_status_total", {"status": "200"}, cap),
            ("http_connections_accepted_total", {}, cap + flood),
            *closed(refused=flood),
            ("http_connections_open", {}, cap),
        ],
    )
    # A freed slot serves again.
    held.pop().close()
    expect_metrics(r, [("http_connections_open", {}, cap - 1)])
    assert r.get("/hello").status == 200
    for s in held:
        s.close()


def test_scrapes_are_served_past_the_cap(start) -> None:
    r = start(max_connections=1, idle_timeout=60)
    with hold(r), connect(r) as refused:
        refused.sendall(REQUEST)
        assert read_response(refused)[0] == 503
        # Prometheus sees the server shedding: its scrapes get a thread beyond the cap.
        scrapes = [connect(r) for _ in range(3)]
        for sock in scrapes:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in scrapes:
            status, _, body = read_response(sock)
            assert status == 200
            assert b"http_requests_refused_total 1.0" in body
        # Beyond the cap by SCRAPE_THREADS at most: a flood of scrapes cannot
        # take the server past its memory budget. The 3 above still hold theirs.
        extra = [connect(r) for _ in range(SCRAPE_THREADS - len(scrapes))]
        for sock in extra:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
        with connect(r) as one_more:
            one_more.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(one_more)[0] == 503
        for sock in scrapes + extra:
            sock.close()


def test_head_past_the_cap_gets_no_body(start) -> None:
    r = start(max_connections=1, idle_timeout=60)
    with hold(r), connect(r) as sock:
        sock.sendall(b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        status, headers, body = split_response(data)
    assert (status, body, headers["connection"]) == (503, b"", "close")
    assert int(headers["content-length"]) > 0  # what a GET would have received


def test_a_silent_connection_past_the_cap_is_closed_at_the_header_deadline_unanswered(start) -> None:
    deadline = 0.5
    r = start(max_connections=1, header_timeout=deadline, idle_timeout=60)
    with hold(r):
        began = time.monotonic()
        with connect(r) as sock:
            data = sock.recv(65536)  # nothing, then end of file
            ended = time.monotonic()
        assert data == b""
        assert deadline - 0.01 <= ended - began < deadline + MARGIN
        expect_metrics(r, [*closed(header_timeout=1), ("http_requests_refused_total", {}, 0)])


def test_the_audit_adds_up_when_part_of_a_run_is_refused(start) -> None:
    r = start(max_connections=4)
    # Twelve connections against four slots: the other eight are refused,
    # reconnect, and are refused again until a slot frees.
    plan = traffic.Plan(traffic.Target.parse(f"http://{HOST}:{r.port}/hello"), concurrency=12, requests=600)
    stats, result = audit.audited_run(plan)
    assert stats.responses == 600
    assert stats.failures == 0
    assert stats.statuses[200] > 0
    assert stats.statuses[503] > 0
    assert result.exact and result.ok, audit.format_audit(result)
    assert '/metrics: response_status_total{status="503"}' in {c.what for c in result.checks}
    assert r.value("http_requests_refused_total") == stats.statuses[503]


# --- drain --------------------------------------------------------------------


def test_shutdown_closes_idle_connections_at_once_and_finishes_the_rest(start) -> None:
    gate, arrived = threading.Event(), threading.Semaphore(0)
    r = start(handler=gated(gate, arrived), header_timeout=30, idle_timeout=30)
    idle, reading, busy = connect(r), connect(r), connect(r)
    idle.sendall(REQUEST.replace(b"/hello", b"/nope"))
    assert read_response(idle)[0] == 404
    reading.sendall(b"GET /hello HTTP/1.1\r\n")
    busy.sendall(REQUEST)
    assert arrived.acquire(timeout=10)
    wait_until(lambda: r.value("http_requests_in_flight") == 1)
    r.stop_event.set()
    # The idle connection is closed while the other two are still busy.
    wait_closed(idle)
    assert r.thread.is_alive()
    reading.sendall(b"Host: x\r\n\r\n")
    gate.set()
    for sock in (reading, busy):
        status, headers, body = split_response(b"".join(iter(lambda s=sock: s.recv(65536), b"")))
        assert (status, body, headers["connection"]) == (200, HELLO_OK, "close")
        sock.close()
    idle.close()
    assert r.stop() is True
    expect_metrics(r, [*closed(shutdown=1, normal=2), ("http_connections_open", {}, 0)])


def test_a_request_that_arrives_as_shutdown_begins_is_answered(start) -> None:
    # serve() marks the server stopping before the accept loop has stopped:
    # a connection the lobby hands over then has its request waiting and is
    # answered (Connection: close), not dropped as if it were idle.
    r = start()
    r.server.stopping = True
    sock = connect(r)
    sock.sendall(REQUEST)
    status, headers, body = split_response(b"".join(iter(lambda: sock.recv(65536), b"")))
    sock.close()
    assert (status, body, headers["connection"]) == (200, HELLO_OK, "close")
    wait_until(lambda: r.value("http_connections_open") == 0)
    expect_metrics(r, [*closed(normal=1), ("response_status_total", {"status": "200"}, 1)])


def test_sigterm_drains_idle_mid_read_and_in_flight_connections(process) -> None:  # noqa: F811 (the fixture)
    # --seed 17: the first /hello delay is over 0.5 s of --max-delay 1.
    p = process("--max-delay", "1", "--failure-rate", "0", "--seed", "17", "--access-log", "off")
    idle = socket.create_connection((HOST, p.port), timeout=10)
    reading = socket.create_connection((HOST, p.port), timeout=10)
    busy = socket.create_connection((HOST, p.port), timeout=10)
    reading.sendall(b"GET /hello HTTP/1.1\r\n")
    busy.sendall(REQUEST)

    def in_flight() -> bool:
        with contextlib.closing(http.client.HTTPConnection(HOST, p.port, timeout=10)) as conn:
            body = fetch(conn, "GET", "/metrics?name[]=http_requests_in_flight").body.decode()
        return bool(re.search(r"^http_requests_in_flight 1\.0$", body, re.M))

    wait_until(in_flight, what="the slow request to be in flight")
    p.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection((HOST, p.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:  # accepted into the backlog just as the socket closed
            pass
        return False

    wait_until(refused, what="the listening socket to close")
    wait_closed(idle)  # at once, not at a deadline: the in-flight request is still sleeping
    reading.sendall(b"Host: x\r\n\r\n")
    for sock in (busy, reading):
        status, headers, body = split_response(b"".join(iter(lambda s=sock: s.recv(65536), b"")))
        assert (status, body, headers["connection"]) == (200, HELLO_OK, "close")
    for sock in (idle, reading, busy):
        sock.close()
    assert p.wait() == 0
    assert p.stderr[-1] == "hello_server: stopped\n"


# --- the request parser, fuzzed -----------------------------------------------

# Not /metrics: the server counts no response to a scrape, not even an error,
# and a client cannot tell which request of a mangled pipeline an error answers.
# Not HEAD: its response's Content-Length announces a body that never comes,
# and a bare HTTP/0.9 answer after it would read as that body.
REAL_REQUESTS = [
    b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /hello?a=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n",
    b"GET /nope?x=%00 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n",
    b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /nope HTTP/1.0\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
    b"GET /hello\r\n",
]
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real request (or two, pipelined) with bytes replaced, inserted, deleted or repeated."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(REAL_REQUESTS), min_size=1, max_size=2))))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["replace", "insert", "delete", "repeat"]))
        chunk = draw(
            st.one_of(
                st.binary(min_size=1, max_size=8),
                st.sampled_from([b"\r\n", b"\n", b" ", b":", b"\x00", b"\xff", b"%", b"HTTP/1.1", b"a" * 70000]),
            )
        )
        if edit == "replace":
            data[at : at + len(chunk)] = chunk
        elif edit == "insert":
            data[at:at] = chunk
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            data[at:at] = data[max(0, at - 40) : at] * draw(st.integers(1, 200))
    # Within what loopback buffers take at once: the client has sent it all
    # before the server can answer an early error and close.
    return bytes(data[:100_000])


def responses(raw: bytes) -> list[int | None]:
    """The statuses of the counted responses in raw, in order.

    None is an HTTP/0.9 response (the standard library answers a request
    line without a version with a bare body, no status line). An interim
    100 Continue has no body and is not counted.
    """
    statuses: list[int | None] = []
    at = 0
    while at < len(raw):
        m = STATUS_LINE.match(raw, at)
        if not m:
            statuses.append(None)
            break
        head_end = raw.index(b"\r\n\r\n", at) + 4
        head = raw[at:head_end]
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
        at = head_end
        if m.group(1).startswith(b"1"):  # 100 Continue: interim, no body, not a response of its own
            continue
        statuses.append(int(m.group(1)))
        if length:
            at += int(length.group(1))
    return statuses


def counted(r: Running) -> dict[str, float]:
    """response_status_total by status label."""
    return {
        sample.labels["status"]: sample.value
        for family in r.registry.collect()
        if family.name == "response_status"
        for sample in family.samples
        if sample.name == "response_status_total"
    }


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Running]:
    config = Config(host=HOST, port=0, max_delay=0.0, failure_rate=0.0, access_log=False, header_timeout=5.0)
    r = Running(hello_server.make_server(config, CollectorRegistry()))
    yield r
    assert r.stop() is True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(mutated(), st.binary(max_size=2048)))
def test_fuzzed_requests_never_kill_the_server_and_each_response_is_counted_once(fuzzed: Running, data: bytes) -> None:
    before = counted(fuzzed)
    with connect(fuzzed) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before it has read it all
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        raw = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                raw += chunk
    statuses = responses(raw)
    # The server closes a connection only after counting its responses.
    after = counted(fuzzed)
    delta = {status: n - before.get(status, 0.0) for status, n in after.items()}
    assert sum(delta.values()) == len(statuses), statuses
    # Each status as often as the client saw it; an HTTP/0.9 answer (None) can be any.
    for status, n in delta.items():
        assert statuses.count(int(status)) <= n <= statuses.count(int(status)) + statuses.count(None), statuses
    assert fuzzed.thread.is_alive()
    assert fuzzed.get("/hello").status == 200
    # Counted just after the client has it: settle before the next example's snapshot.
    expect_metrics(fuzzed, [("response_status_total", {"status": "200"}, after.get("200", 0.0) + 1)])


# --- configuration ------------------------------------------------------------


def test_connection_settings_defaults_and_environment() -> None:
    config = hello_server.parse_args([], environ={})
    assert (config.header_timeout, config.idle_timeout, config.write_timeout, config.max_connections) == (
        10.0,
        75.0,
        30.0,
        4096,
    )
    assert hello_server.parse_args(["--write-timeout", "2.5"], environ={}).write_timeout == 2.5
    assert hello_server.parse_args([], environ={"HELLO_WRITE_TIMEOUT": "5"}).write_timeout == 5.0
    env = {"HELLO_HEADER_TIMEOUT": "2.5", "HELLO_IDLE_TIMEOUT": "620", "HELLO_MAX_CONNECTIONS": "100"}
    config = hello_server.parse_args([], environ=env)
    assert (config.header_timeout, config.idle_timeout, config.max_connections) == (2.5, 620.0, 100)
    config = hello_server.parse_args(["--max-connections", "7", "--idle-timeout", "1"], environ=env)
    assert (config.header_timeout, config.idle_timeout, config.max_connections) == (2.5, 1.0, 7)


@pytest.mark.parametrize(
    ("argv", "environ", "mention"),
    [
        (["--header-timeout", "0"], {}, "--header-timeout"),
        (["--header-timeout", "nan"], {}, "--header-timeout"),
        (["--idle-timeout", "-1"], {}, "--idle-timeout"),
        (["--idle-timeout", "inf"], {}, "--idle-timeout"),
        (["--write-timeout", "0"], {}, "--write-timeout"),
        (["--max-connections", "0"], {}, "--max-connections"),
        (["--max-connections", "1.5"], {}, "--max-connections"),
        ([], {"HELLO_MAX_CONNECTIONS": "lots"}, "HELLO_MAX_CONNECTIONS"),
        ([], {"HELLO_HEADER_TIMEOUT": "10s"}, "HELLO_HEADER_TIMEOUT"),
    ],
)
def test_connection_settings_invalid_values_exit_2(capsys, argv, environ, mention) -> None:
    with pytest.raises(SystemExit) as exit_info:
        hello_server.parse_args(argv, environ=environ)
    assert exit_info.value.code == 2
    assert mention in capsys.readouterr().err
