"""End to end: the app and a real Prometheus (stack.native_stack), queried through its HTTP API.

Proves that the monitoring configuration works on live data: the tutorial's
query, every recording rule, every query of the Grafana dashboard and every
rule expression, the dashboard's metric names against a real scrape, and the
error-ratio alert going pending when every request fails. Prometheus scrapes
and evaluates rules every second here; every wait is on a condition with a
deadline. Under CI=true these tests must run (conftest.require_tool).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import audit
import check_dashboards
import promapi
import stack
import traffic
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((ROOT / "rules").glob("*.yml"))
RULES = [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]
RECORDED = [rule["record"] for rule in RULES if "record" in rule]
ALERTS = {rule["alert"]: rule for rule in RULES if "alert" in rule}
DASHBOARD = json.loads((check_dashboards.DASHBOARDS / "hello.json").read_text())
DASHBOARD_QUERIES = check_dashboards.expressions(DASHBOARD)
# Series Prometheus itself writes: per-target scrape metrics and alert state.
SYNTHETIC = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
    "ALERTS",
    "ALERTS_FOR_STATE",
}
# Short delays keep a single-threaded loop busy enough; the default 20% failures stay.
APP_ARGS = ["--access-log", "off", "--max-delay", "0.05"]
TIMEOUT = 30.0


class Traffic:
    """GET /hello in a loop on one keep-alive connection, in a thread, until stopped.

    Bounded twice over: at most max_requests requests and max_seconds seconds,
    so a forgotten stop cannot leave load running. Every tenth request goes to
    an unknown path, so the "other" path label and a 404 get traffic too.
    """

    def __init__(self, app_url: str, max_requests: int = 5000, max_seconds: float = 90.0) -> None:
        self.netloc = urlsplit(app_url).netloc
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        connection = http.client.HTTPConnection(self.netloc, timeout=10)
        try:
            while not self._stop.is_set() and self.sent < self.max_requests and time.monotonic() < deadline:
                path = "/hello" if self.sent % 10 else "/no-such-page"
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                self.sent += 1
                self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
        finally:
            connection.close()

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


@contextmanager
def running_stack(app_args: list[str]) -> Iterator[stack.Stack]:
    require_tool("prometheus")
    with (
        stack.native_stack(app_args=app_args, scrape_interval="1s", evaluation_interval="1s") as running,
        Traffic(running.app_url),
    ):
        running.wait_for_scrape(timeout=TIMEOUT)
        yield running


@pytest.fixture(scope="module")
def live() -> Iterator[stack.Stack]:
    """The stack with the app's designed behaviour and traffic flowing throughout."""
    with running_stack(APP_ARGS) as running:
        yield running


def values(prometheus_url: str, expr: str) -> list[float]:
    return [float(sample["value"][1]) for sample in stack.query(prometheus_url, expr)]


def test_the_tutorial_query_is_positive(live):
    expr = 'rate(http_requests_total{path="/hello"}[1m])'
    rates = stack.wait_until(lambda: [v for v in values(live.prometheus_url, expr) if v > 0], TIMEOUT, expr)
    assert len(rates) == 1


def test_every_recording_rule_has_a_value(live):
    assert len(RECORDED) >= 15
    missing = list(RECORDED)

    def all_recorded() -> bool:
        missing[:] = [name for name in missing if not stack.query(live.prometheus_url, name)]
        return not missing

    try:
        stack.wait_until(all_recorded, TIMEOUT, "every recording rule")
    except stack.StackError:
        pytest.fail(f"no value after {TIMEOUT:g} s for {missing}")
    # Spot checks against what the traffic is: some requests, 20% designed failures.
    assert values(live.prometheus_url, 'job_path:http_requests:rate5m{path="/hello"}')[0] > 0
    p50 = values(live.prometheus_url, 'job_path:http_response_time_seconds:p50_rate5m{path="/hello"}')[0]
    assert 0 < p50 <= 0.1


def test_every_dashboard_and_rule_expression_runs(live):
    # Wait until the rules have data, so "returns data" below means the query is right.
    stack.wait_until(lambda: stack.query(live.prometheus_url, "instance:process_cpu_seconds:rate5m"), TIMEOUT, "rules")
    queries = [(where, check_dashboards.promql(expr)) for where, expr in DASHBOARD_QUERIES]
    queries += [(f"rule {rule.get('record') or rule.get('alert')}", rule["expr"]) for rule in RULES]
    errors, empty = [], []
    for where, expr in queries:
        try:
            result = stack.query(live.prometheus_url, expr)
        except promapi.PrometheusError as e:
            errors.append(f"{where}: {e}")
            continue
        # The dashboard's queries must also find series; only the alert panels may be
        # empty (no alert pending), and alert conditions are rightly false here.
        if where.startswith("panel") and not result and "ALERTS" not in expr:
            empty.append(f"{where}: {expr}")
    assert not errors, "\n".join(errors)
    assert not empty, "queries that found no series:\n" + "\n".join(empty)


def test_the_dashboard_uses_only_metrics_that_exist(live):
    with urllib.request.urlopen(f"{live.app_url}/metrics", timeout=10) as response:
        exposition = response.read().decode()
    exposed = {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}
    known = exposed | set(RECORDED) | SYNTHETIC
    used = set().union(*(check_dashboards.metric_names(expr) for _, expr in DASHBOARD_QUERIES))
    assert used - known == set(), f"the dashboard queries metrics nothing exposes: {sorted(used - known)}"
    in_rules = set().union(*(check_dashboards.metric_names(rule["expr"]) for rule in RULES))
    assert in_rules - known == set(), f"the rules query metrics nothing exposes: {sorted(in_rules - known)}"
    # And the golden signals are all on the dashboard.
    assert {"http_requests_total", "response_status_total", "http_response_time_seconds_bucket"} <= used
    assert {"http_requests_in_flight", "process_cpu_seconds_total", "up"} <= used


def test_the_error_ratio_alert_goes_pending_when_every_request_fails():
    with running_stack(["--access-log", "off", "--max-delay", "0.01", "--failure-rate", "1"]) as failing:
        expr = 'ALERTS{alertname="HelloErrorRatioHigh", alertstate="pending"}'
        pending = stack.wait_until(lambda: stack.query(failing.prometheus_url, expr), TIMEOUT, expr)
        assert pending[0]["metric"]["job"] == "hello"
        assert pending[0]["metric"]["severity"] == "warning"
        # Every /hello is a 500; every tenth request goes to an unknown path, a 404.
        [ratio] = values(failing.prometheus_url, "job:slo_errors_per_request:ratio_rate5m")
        assert 0.8 <= ratio <= 1
        # Its `for` (5m) keeps it from firing in a test's lifetime.
        assert ALERTS["HelloErrorRatioHigh"]["for"] == "5m"


def _makefile_default(variable: str) -> str:
    """The value of `VARIABLE ?= value` in the Makefile."""
    [value] = re.findall(rf"^{variable}\s*\?=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    return value.strip()


def test_the_banner_agrees_with_the_makefiles_defaults():
    assert _makefile_default("LOAD_ARGS") == stack.MAKE_LOAD_ARGS
    assert _makefile_default("PROMETHEUS") == stack.MAKE_PROMETHEUS
    replica = stack.Replica("127.0.0.1", 8080, Path("/tmp/x/app.log"), (), None)  # type: ignore[arg-type]
    default = stack.Stack([replica], "http://127.0.0.1:9090", Path("/tmp/x"), None)  # type: ignore[arg-type]
    text = stack.banner(default)
    assert "  make load\n  make queries\n  make report\n" in text
    # Several replicas: every one is printed, and make load spreads over them.
    more = [stack.Replica("127.0.0.1", port, Path("/tmp/x/app.log"), (), None) for port in (8080, 8081)]  # type: ignore[arg-type]
    text = stack.banner(stack.Stack(more, "http://127.0.0.1:9090", Path("/tmp/x"), None))  # type: ignore[arg-type]
    assert re.search(r"^app +http://127\.0\.0\.1:8081/hello ", text, re.M)
    urls = "http://127.0.0.1:8080/hello http://127.0.0.1:8081/hello"
    assert f'  make load LOAD_ARGS="{urls} {stack.MAKE_LOAD_ARGS}"' in text


def test_stack_on_other_ports_prints_commands_that_reach_them():
    require_tool("prometheus")
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "stack.py"),
        "--app-port",
        "0",
        "--prometheus-port",
        "0",
        "--alertmanager-port",
        "0",
        "--receiver-port",
        "0",
    ]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            lines = []
            # The banner ends with the line on Ctrl-C; stack.py exits (EOF) if it cannot start.
            while (line := proc.stdout.readline()) and "Ctrl-C" not in line:
                lines.append(line.rstrip("\n"))
            text = "\n".join(lines)
            app = re.search(r"^app +(http://127\.0\.0\.1:\d+)/hello ", text, re.M)
            prom = re.search(r"^prometheus +(http://127\.0\.0\.1:\d+)/graph", text, re.M)
            assert app and prom, text
            assert app[1] != stack.MAKE_APP_URL and ":9090" not in prom[1]
            load_args = f"{app[1]}/hello {stack.MAKE_LOAD_ARGS}"
            assert f'  make load LOAD_ARGS="{load_args}"' in lines
            assert f"  make queries PROMETHEUS={prom[1]}" in lines
            assert f"  make report PROMETHEUS={prom[1]}" in lines
            # The rules page it names is there.
            [rules] = [line.split()[1] for line in lines if line.startswith("rules ")]
            assert rules == prom[1] + "/classic/rules"
            with urllib.request.urlopen(rules, timeout=10) as response:
                assert response.status == 200
                assert "HelloErrorRatioHigh" in response.read().decode()
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_replicas_are_discovered_from_a_file_summed_exactly_and_revived():
    require_tool("prometheus")
    with stack.native_stack(app_args=APP_ARGS, scrape_interval="1s", evaluation_interval="1s", replicas=3) as s:
        assert len(set(s.app_urls)) == 3
        ups = 'up{job="hello"}'
        stack.wait_until(lambda: values(s.prometheus_url, ups) == [1.0] * 3, TIMEOUT, "three targets up")
        targets = [traffic.Target.parse(url + "/hello") for url in s.app_urls]
        plan = traffic.Plan(targets[0], rate=200, requests=600, replicas=tuple(targets[1:]))
        stats, result = audit.audited_run(plan, prometheus_url=s.prometheus_url, scrape_timeout=TIMEOUT)
        assert stats.responses == 600
        assert result.exact, audit.format_audit(result)
        assert {"/metrics: summed over 3 servers", "Prometheus: summed over 3 targets"} <= set(result.notes)

        # A replica that dies is started again on its port, and Prometheus sees the new process.
        victim = s.replicas[1]
        started = f'process_start_time_seconds{{instance="127.0.0.1:{victim.port}"}}'
        [before] = values(s.prometheus_url, started)
        victim.process.kill()
        victim.process.wait()
        assert s.revive() == [victim] and victim.restarts == 1
        assert s.stopped() is None
        stack.wait_until(lambda: values(s.prometheus_url, started) not in ([], [before]), TIMEOUT, "the new process")


def test_the_docs_command_that_fires_the_alerts_makes_every_request_fail():
    """docs/stack.md's `make stack HELLO_FAILURE_RATE=1`: make hands the variable to the app."""
    require_tool("prometheus")
    assert "make stack HELLO_FAILURE_RATE=1 " in (ROOT / "docs" / "stack.md").read_text()
    cmd = [
        "make",
        "--no-print-directory",
        "stack",
        "HELLO_FAILURE_RATE=1",
        "STACK_ARGS=--app-port 0 --prometheus-port 0 --alertmanager-port 0 --receiver-port 0",
    ]
    # Its own session: SIGINT to the group reaches make and stack.py, as Ctrl-C would.
    with subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = []
            while (line := proc.stdout.readline()) and "Ctrl-C" not in line:
                lines.append(line)
            app = re.search(r"^app +(http://127\.0\.0\.1:\d+)/hello ", "".join(lines), re.M)
            assert app, "".join(lines)
            statuses = []
            for _ in range(5):
                try:
                    urllib.request.urlopen(app[1] + "/hello", timeout=10).close()
                    statuses.append(200)
                except urllib.error.HTTPError as e:
                    statuses.append(e.code)
            assert statuses == [500] * 5
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=30)
    # make itself dies of the SIGINT, as on Ctrl-C; stack.py stops them all cleanly.
    assert "stack: stopped" in err, err
