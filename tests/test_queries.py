"""End to end through a real Prometheus: the audit, every catalogue query, the report, the demo.

One app and one Prometheus (1 s scrapes, temporary TSDB) serve the whole
module: loadgen drives them once with --audit --prometheus, then every query
in queries.py must return data.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import demo
import loadgen
import queries
import report
import stack
from conftest import require_tool
from hello_server import Config, make_server

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Traffic:
    stack: stack.Stack
    exit_code: int
    output: str
    summary: dict


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    require_tool("prometheus")
    out = tmp_path_factory.mktemp("traffic") / "run.json"
    app = ["--access-log", "off", "--max-delay", "0.05", "--failure-rate", "0.3", "--seed", "4"]
    with stack.native_stack(app_args=app, scrape_interval="1s", evaluation_interval="1s") as s:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            args = [s.app_url + "/hello", "--rate", "200", "--duration", "4", "--quiet", "--audit", "--json", str(out)]
            code = loadgen.main([*args, "--prometheus", s.prometheus_url, "--scrape-timeout", "30"])
        yield Traffic(s, code, stdout.getvalue(), json.loads(out.read_text()) if out.exists() else {})


def test_audit_agrees_exactly_directly_and_through_prometheus(traffic: Traffic) -> None:
    assert traffic.exit_code == 0, traffic.output
    audit = traffic.summary["audit"]
    assert audit["ok"] and audit["exact"], traffic.output
    sources = {check["what"].split(":")[0] for check in audit["checks"]}
    assert sources == {"/metrics", "Prometheus"}
    prometheus_checks = [c for c in audit["checks"] if c["what"].startswith("Prometheus:")]
    assert {c["what"] for c in prometheus_checks} >= {
        'Prometheus: http_requests_total{path="/hello"}',
        'Prometheus: response_status_total{status="200"}',
        'Prometheus: response_status_total{status="500"}',
        'Prometheus: http_response_time_seconds_count{path="/hello"}',
    }
    assert all(c["observed"] == c["expected"] for c in prometheus_checks)
    assert traffic.summary["sent"] == 800
    assert "audit: PASS, exact" in traffic.output


@pytest.mark.parametrize("name", [q.name for q in queries.CATALOGUE])
def test_every_catalogue_query_returns_data(traffic: Traffic, name: str) -> None:
    result = stack.query(traffic.stack.prometheus_url, queries.BY_NAME[name].expr)
    assert result, f"{name} returned no series"
    values = [float(r["value"][1]) for r in result]
    assert all(math.isfinite(v) for v in values), f"{name}: {values}"


def test_catalogue_answers_match_the_traffic(traffic: Traffic) -> None:
    # Not a timing check: counts and shares the client knows exactly.
    url = traffic.stack.prometheus_url
    statuses = traffic.summary["statuses"]
    share = {
        r["metric"]["status"]: float(r["value"][1]) for r in stack.query(url, queries.BY_NAME["status_share"].expr)
    }
    # Over a window that holds the whole run, rate ratios are count ratios.
    assert share["500"] == pytest.approx(statuses["500"] / traffic.summary["sent"], abs=0.005)
    assert float(stack.query(url, queries.BY_NAME["error_ratio"].expr)[0]["value"][1]) == pytest.approx(share["500"])


def test_queries_table(traffic: Traffic, capsys: pytest.CaptureFixture[str]) -> None:
    assert queries.main(["--prometheus", traffic.stack.prometheus_url, "--exprs"]) == 0
    out = capsys.readouterr().out
    for q in queries.CATALOGUE:
        assert q.name in out and q.expr in out
    assert "no data" not in out


def test_report_png(traffic: Traffic, tmp_path: Path) -> None:
    end = time.time()
    png = report.render(traffic.stack.prometheus_url, end - 60, end, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("status_rate", "error_ratio", "latency_p50", "latency_p90", "latency_p99", "in_flight"):
        assert report.fetch(traffic.stack.prometheus_url, name, end - 60, end, 1, report.DEFAULT_WINDOW), name


@pytest.fixture(scope="module")
def app_url() -> Iterator[str]:
    """The hello server itself, which a user may pass as --prometheus by mistake."""
    server = make_server(Config(host="127.0.0.1", port=0, access_log=False))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tool", [queries, report], ids=["queries", "report"])
@pytest.mark.parametrize(
    "url, expected",
    [
        ("notaurl", "'notaurl' is not a URL; expected a Prometheus base URL like http://localhost:9090"),
        ("localhost:9090", "is not a URL; expected a Prometheus base URL like http://localhost:9090"),
        ("{app}", "{app} answered HTTP 404 to /api/v1/query"),
        ("{app}/", "{app} answered HTTP 404 to /api/v1/query"),
        (
            "http://127.0.0.1:{closed}",
            "nothing listening at http://127.0.0.1:{closed}: start Prometheus with `make stack`",
        ),
    ],
)
def test_a_wrong_prometheus_url_is_one_line_and_exit_2(
    tool, url: str, expected: str, app_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = _closed_port()
    url, expected = (x.format(app=app_url, closed=closed) for x in (url, expected))
    extra = ["--output", str(tmp_path / "r.png")] if tool is report else []
    assert tool.main(["--prometheus", url, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(f"{tool.__name__}: ") and expected in line, line
    if "404" in expected:
        # report.py asks /api/v1/query_range; the verdict is the same.
        assert "but is not a Prometheus API; expected a Prometheus base URL like http://localhost:9090" in line
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("output", ["/dev/null/report.png", "{tmp}"])
def test_report_refuses_an_unwritable_output_before_querying(
    output: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = output.format(tmp=tmp_path)
    # Nothing listens there either: the output is checked first.
    assert report.main(["--prometheus", f"http://127.0.0.1:{_closed_port()}", "--output", output]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"report: --output {output}: ") and line.endswith("; choose another path"), line


def test_docs_list_the_catalogue() -> None:
    assert (ROOT / "docs" / "queries.md").read_text() == queries.markdown(), (
        "docs/queries.md is stale: python tools/queries.py --markdown > docs/queries.md"
    )


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_tool("prometheus")
    assert demo.main(["--rate", "50", "--duration", "3", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "audit: PASS, exact" in out
    assert "Prometheus: response_status_total" in out
    assert "no data" not in out
    assert (tmp_path / "report.png").stat().st_size > 0
    assert out.rstrip().endswith("demo: app and Prometheus stopped")
