"""loadgen.py against the real hello server on loopback: exact counts, the audit, bad arguments."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import audit
import loadgen
import traffic
from hello_server import Config, make_server

TOOLS = Path(__file__).resolve().parent.parent / "tools"

ServerFactory = Callable[..., str]


@pytest.fixture
def server() -> Iterator[ServerFactory]:
    """Start hello servers on ephemeral loopback ports; returns their base URL."""
    started = []

    def start(**overrides: object) -> str:
        settings = {"host": "127.0.0.1", "port": 0, "max_delay": 0.0, "failure_rate": 0.3, "seed": 7}
        config = Config(access_log=False, **(settings | overrides))  # type: ignore[arg-type]
        srv = make_server(config)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        started.append((srv, thread))
        host, port = srv.server_address[:2]
        return f"http://{host}:{port}"

    yield start
    for srv, thread in started:
        srv.shutdown()
        thread.join()
        srv.server_close()


def plan(url: str, **kw: object) -> traffic.Plan:
    return traffic.Plan(traffic.Target.parse(url), **kw)  # type: ignore[arg-type]


def test_closed_loop_counts_every_request_exactly(server: ServerFactory) -> None:
    base = server(failure_rate=0.5)
    stats, result = audit.audited_run(plan(base + "/hello", concurrency=8, requests=400))
    assert stats.sent == stats.responses == 400
    assert set(stats.statuses) == {200, 500}
    assert stats.failures == 0
    assert result.exact and result.ok, audit.format_audit(result)
    assert {c.what for c in result.checks} >= {
        '/metrics: http_requests_total{path="/hello"}',
        '/metrics: response_status_total{status="200"}',
        '/metrics: response_status_total{status="500"}',
        '/metrics: http_response_time_seconds_count{path="/hello"}',
    }


def test_open_loop_sends_the_planned_count_and_reuses_connections(server: ServerFactory) -> None:
    base = server(max_delay=0.02)
    stats, result = audit.audited_run(plan(base + "/hello", rate=200.0, requests=150))
    assert stats.sent == stats.responses == 150
    assert len(stats.send_lags) == len(stats.latencies) == 150
    # Keep-alive: far fewer connections than requests.
    assert stats.connections_opened < 150
    assert all(lat >= svc for lat, svc in zip(stats.latencies, stats.service_times, strict=True))
    assert result.exact, audit.format_audit(result)


@pytest.mark.parametrize("how", [{"rate": 300.0}, {"concurrency": 6}])
def test_replicas_share_the_traffic_and_the_audit_sums_over_them(server: ServerFactory, how: dict) -> None:
    bases = [server(), server(), server()]
    targets = [traffic.Target.parse(base + "/hello") for base in bases]
    p = traffic.Plan(targets[0], requests=300, replicas=tuple(targets[1:]), **how)
    stats, result = audit.audited_run(p)
    assert stats.sent == stats.responses == 300
    assert result.exact, audit.format_audit(result)
    assert "/metrics: summed over 3 servers" in result.notes
    counted = [audit.series(audit.scrape(base + "/metrics"), "http_requests_total", "path")["/hello"] for base in bases]
    # Round robin: each replica got its share (closed loop: two connections each).
    assert sum(counted) == 300
    if "rate" in how:
        assert counted == [100, 100, 100]
    else:
        assert all(c > 0 for c in counted)


def test_open_loop_duration_sets_the_count_from_the_schedule(server: ServerFactory) -> None:
    base = server()
    stats = traffic.run(plan(base + "/hello", rate=100.0, duration=0.5))
    # Requests are due at 0, 10 ms, ..., 490 ms.
    assert stats.sent == stats.responses == 50


def test_unknown_path_is_audited_under_the_servers_catch_all_label(server: ServerFactory) -> None:
    base = server()
    stats, result = audit.audited_run(plan(base + "/no/such/page?x=1", concurrency=3, requests=30))
    assert stats.statuses == {404: 30}
    assert result.exact, audit.format_audit(result)
    assert '/metrics: http_requests_total{path="other"}' in {c.what for c in result.checks}


def test_head_requests(server: ServerFactory) -> None:
    base = server(failure_rate=0.0)
    stats, result = audit.audited_run(plan(base + "/hello", concurrency=2, requests=20, method="HEAD"))
    assert stats.statuses == {200: 20}
    assert result.exact


def test_audit_quantiles_name_the_buckets(server: ServerFactory) -> None:
    base = server(max_delay=0.03, failure_rate=0.0)
    _, result = audit.audited_run(plan(base + "/hello", concurrency=10, requests=100))
    assert [r["quantile"] for r in result.quantiles] == [0.5, 0.9, 0.99]
    bounds = (0.0, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, float("inf"))
    for row in result.quantiles:
        for value, bucket in ((row["client"], row["client_bucket"]), (row["histogram"], row["histogram_bucket"])):
            lower, upper = bucket
            assert lower < value <= upper or value == lower == 0
            # Adjacent default bounds: a bucket, not a range of them.
            assert bounds.index(upper) == bounds.index(lower) + 1
        assert row["difference"] == pytest.approx(row["histogram"] - row["client"])


def test_timeouts_are_counted_and_widen_the_audit(server: ServerFactory) -> None:
    base = server(max_delay=0.5, failure_rate=0.0, seed=1)
    stats, result = audit.audited_run(plan(base + "/hello", concurrency=4, requests=8, timeout=0.001))
    assert stats.sent == 8
    assert stats.timeouts + stats.responses == 8
    assert stats.timeouts > 0
    # The server may have answered (and counted) the ones the client gave up on.
    assert result.ok
    assert result.notes


def test_audit_fails_when_the_server_counts_something_else(server: ServerFactory, capsys) -> None:
    busy, idle = server(), server()
    # The audit reads an idle server's /metrics: nothing there moved.
    code = loadgen.main([busy + "/hello", "--concurrency", "2", "--requests", "10", "--quiet", "--audit",
                         "--metrics-url", idle + "/metrics"])  # fmt: skip
    assert code == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out
    assert "audit: FAIL" in out


def test_count_checks_catch_a_single_miscount() -> None:
    stats = traffic.Stats(plan("http://127.0.0.1:1/hello", concurrency=1, requests=3))
    stats.statuses.update({200: 2, 500: 1})

    def exposition(ok: float, err: float) -> dict:
        return audit.parse_exposition(
            f'http_requests_total{{path="/hello"}} {ok + err}\n'
            f'response_status_total{{status="200"}} {ok}\n'
            f'response_status_total{{status="500"}} {err}\n'
            "# TYPE http_response_time_seconds histogram\n"
            f'http_response_time_seconds_bucket{{path="/hello",le="+Inf"}} {ok + err}\n'
            f'http_response_time_seconds_count{{path="/hello"}} {ok + err}\n'
            f'http_response_time_seconds_sum{{path="/hello"}} 0\n'
        )

    before = exposition(10, 5)
    assert all(c.ok for c in audit.count_checks(stats, before, exposition(12, 6), "x"))
    # One 500 counted as a 200: the totals agree, the statuses do not.
    bad = [c.what for c in audit.count_checks(stats, before, exposition(13, 5), "x") if not c.ok]
    assert bad == ['x: response_status_total{status="200"}', 'x: response_status_total{status="500"}']


def test_histogram_quantile_matches_prometheus() -> None:
    # Values worked out by hand with Prometheus' linear interpolation.
    cumulative = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)]
    assert audit.histogram_quantile(0.25, cumulative) == pytest.approx(0.1)
    assert audit.histogram_quantile(0.5, cumulative) == pytest.approx(0.1 + 0.4 * 10 / 20)
    assert audit.histogram_quantile(0.9, cumulative) == pytest.approx(0.5 + 0.5 * 6 / 10)
    # Ranks in the +Inf bucket answer the largest finite bound.
    assert audit.histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1
    assert audit.bucket_of(0.3, [0.1, 0.5, 1.0]) == (0.1, 0.5)
    assert audit.bucket_of(2.0, [0.1, 0.5, 1.0]) == (1.0, float("inf"))


def test_json_summary_and_progress_lines(server: ServerFactory, tmp_path: Path, capsys) -> None:
    base = server(max_delay=0.01)
    out = tmp_path / "run.json"
    args = [base + "/hello", "--rate", "50", "--duration", "1", "--audit", "--json", str(out)]
    assert loadgen.main([*args, "--progress-interval", "0.2"]) == 0
    captured = capsys.readouterr()
    # stderr is not a terminal here: plain progress lines.
    progress = [line for line in captured.err.splitlines() if " sent " in line]
    assert progress and all("p50" in line and "p99" in line for line in progress)
    assert "\r" not in captured.err
    assert "status 200" in captured.out and "audit: PASS, exact" in captured.out
    summary = json.loads(out.read_text())
    assert summary["sent"] == 50
    assert sum(summary["statuses"].values()) == 50
    assert summary["audit"]["ok"] and summary["audit"]["exact"]
    for key in ("min", "p50", "p90", "p99", "max"):
        assert summary["latency_seconds"][key] >= 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rate", "0"], "--rate"),
        (["--rate", "-5"], "--rate"),
        (["--concurrency", "0"], "--concurrency"),
        (["--duration", "nan"], "--duration"),
        (["--rate", "1", "--concurrency", "1"], "not allowed"),
        (["http://127.0.0.1:{closed}/hello", "--requests", "1"], "cannot connect"),
        (["ftp://127.0.0.1/hello"], "malformed URL"),
        (["http:///hello"], "malformed URL"),
        (["http://127.0.0.1:99999/hello"], "malformed URL"),
        (["not a url"], "malformed URL"),
        (["--prometheus", "http://127.0.0.1:9090"], "--prometheus needs --audit"),
        (["--audit", "--job", "hello"], "--job needs --prometheus"),
        (["http://127.0.0.1:1/hello", "http://127.0.0.1:2/other"], "same path"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str) -> None:
    args = [a.format(closed=_closed_port()) for a in args]
    result = subprocess.run(
        [sys.executable, str(TOOLS / "loadgen.py"), *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("loadgen: error: ") and message in lines[0]


def test_ctrl_c_stops_the_schedule_and_still_adds_up(server: ServerFactory) -> None:
    base = server(max_delay=0.2)
    cmd = [sys.executable, str(TOOLS / "loadgen.py"), base + "/hello", "--rate", "100", "--duration", "60"]
    with subprocess.Popen(
        [*cmd, "--audit", "--progress-interval", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stderr is not None
        # Wait for traffic to be under way: the first progress line.
        for line in proc.stderr:
            if " sent " in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopping; waiting for" in err
    assert "stopped early by Ctrl-C" in out
    assert "audit: PASS, exact" in out


@pytest.mark.parametrize(
    "target, instances, expected",
    [
        ("http://127.0.0.1:8080/hello", ["localhost:8080", "localhost:9090"], "localhost:8080"),
        ("http://localhost:18080/hello", ["127.0.0.1:18080", "127.0.0.1:19090"], "127.0.0.1:18080"),
        # Docker: Prometheus scrapes app:8080, the client sends to the published port.
        ("http://localhost:8080/hello", ["app:8080", "localhost:9090"], "app:8080"),
        ("http://localhost:8080/hello", ["a:8080", "b:8080"], None),
        ("http://localhost:8080/hello", ["localhost:9090"], None),
    ],
)
def test_prometheus_target_matching(monkeypatch, target: str, instances: list[str], expected: str | None) -> None:
    prom = audit.Prometheus("http://127.0.0.1:1")
    monkeypatch.setattr(prom, "query", lambda expr: [{"metric": {"instance": i}, "value": [0, "1"]} for i in instances])
    t = traffic.Target.parse(target)
    if expected is None:
        with pytest.raises(traffic.UsageError):
            prom.instance_of(t, deadline=0)
    else:
        assert prom.instance_of(t, deadline=0) == expected


def test_prometheus_selector_of_a_job_or_of_the_targets(monkeypatch) -> None:
    prom = audit.Prometheus("http://127.0.0.1:1")
    instances = ["127.0.0.1:18080", "127.0.0.1:18081", "localhost:9090"]
    monkeypatch.setattr(
        prom, "query", lambda expr: [{"metric": {"instance": i, "job": "hello"}, "value": [0, "1"]} for i in instances]
    )
    targets = [traffic.Target.parse(f"http://localhost:{port}/hello") for port in (18080, 18081)]
    assert prom.selector(targets, "hello", deadline=0) == 'job="hello"'
    assert prom.selector(targets[:1], None, deadline=0) == 'instance="127.0.0.1:18080"'
    # A PromQL string holding an RE2 regular expression: the dots are literal.
    assert prom.selector(targets, None, deadline=0) == r'instance=~"127\\.0\\.0\\.1:18080|127\\.0\\.0\\.1:18081"'


class _Framings(BaseHTTPRequestHandler):
    """Responses framed the ways hello_server never uses: chunked, and ended by closing."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/chunked" else 201)
        if self.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"Hel", b"lo, ", b"chunks!\r\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the connection closes\n")
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("path, status", [("/chunked", 200), ("/eof", 201)])
def test_other_response_framings(path: str, status: int) -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Framings)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        stats = traffic.run(plan(f"http://127.0.0.1:{srv.server_address[1]}{path}", concurrency=2, requests=20))
    finally:
        srv.shutdown()
        thread.join()
        srv.server_close()
    assert stats.statuses == {status: 20}
    assert stats.failures == 0
    # Chunked responses keep the connection; the others close it every time.
    assert stats.connections_opened == (2 if path == "/chunked" else 20)


def _hello_count(base: str) -> float:
    return audit.series(audit.scrape(base + "/metrics"), traffic.REQUESTS, "path").get("/hello", 0.0)


def _loadgen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOLS / "loadgen.py"), *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("where", ["/nonexistent/dir/x.json", "{tmp}"])
def test_an_unwritable_json_path_is_refused_before_any_traffic(
    server: ServerFactory, tmp_path: Path, where: str
) -> None:
    base = server()
    path = where.format(tmp=tmp_path)
    result = _loadgen(base + "/hello", "--requests", "20", "--audit", "--json", path)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"loadgen: error: --json {path}: "), line
    assert _hello_count(base) == 0


@pytest.mark.parametrize(
    "flag, url, expected",
    [
        ("--metrics-url", "http://127.0.0.1:{closed}/metrics", "cannot scrape http://127.0.0.1:{closed}/metrics: "),
        ("--metrics-url", "{base}/nope", "cannot scrape {base}/nope: HTTP 404; is it the server's /metrics?"),
        ("--prometheus", "http://127.0.0.1:{closed}", "nothing listening at http://127.0.0.1:{closed}: "),
        ("--prometheus", "{base}", "{base} answered HTTP 404 to /api/v1/query but is not a Prometheus API"),
    ],
)
def test_an_audit_url_that_does_not_work_is_named_before_any_traffic(
    server: ServerFactory, flag: str, url: str, expected: str
) -> None:
    base = server()
    closed = _closed_port()
    url, expected = (x.format(base=base, closed=closed) for x in (url, expected))
    result = _loadgen(base + "/hello", "--requests", "20", "--quiet", "--audit", flag, url)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # The plan line first, the error last.
    lines = result.stderr.splitlines()
    assert lines[0].startswith("loadgen: GET "), result.stderr
    assert lines[-1].startswith("loadgen: error: ") and expected in lines[-1], lines[-1]
    assert lines[-1].endswith("(nothing was sent)")
    assert _hello_count(base) == 0


def test_a_page_that_is_not_an_exposition_is_named(server: ServerFactory) -> None:
    url = server(failure_rate=0.0) + "/hello"
    with pytest.raises(audit.ScrapeError, match=f"^{url} is not a Prometheus exposition "):
        audit.scrape(url)


def test_a_failed_scrape_names_its_url() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/metrics"
    with pytest.raises(audit.ScrapeError, match=f"^cannot scrape {url}: Connection refused$"):
        audit.scrape(url)


def test_the_plan_line_shows_once_on_a_terminal(server: ServerFactory) -> None:
    base = server()
    primary, secondary = pty.openpty()
    with subprocess.Popen(
        [sys.executable, str(TOOLS / "loadgen.py"), base + "/hello", "--requests", "5", "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    ) as proc:
        os.close(secondary)
        output = b""
        # Read to the end: EIO once the child has closed the terminal.
        with contextlib.suppress(OSError):
            while chunk := os.read(primary, 4096):
                output += chunk
        assert proc.wait(timeout=30) == 0
    os.close(primary)
    text = output.decode()
    assert text.count("loadgen: GET ") == 1, text
    assert "answered" in text


def test_the_plan_line_heads_a_saved_summary(server: ServerFactory, tmp_path: Path) -> None:
    base = server()
    result = _loadgen(base + "/hello", "--requests", "5", "--quiet")
    assert result.returncode == 0
    # Each stream on its own says what ran: stderr as it starts, stdout's summary.
    assert result.stderr.startswith("loadgen: GET ")
    assert result.stdout.startswith("loadgen: GET ")
