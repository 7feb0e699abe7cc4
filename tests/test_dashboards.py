"""Offline checks of the Grafana dashboard (no Grafana here): check_dashboards.py works and passes."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

import check_dashboards as cd
import metrics

DASHBOARD = json.loads((cd.DASHBOARDS / "hello.json").read_text())
UIDS = cd.provisioned_datasource_uids()


def test_the_dashboard_has_no_problems():
    assert cd.provisioned_datasource_uids() == {"prometheus"}
    assert cd.problems(DASHBOARD, UIDS) == []


def test_it_shows_every_golden_signal_the_process_and_the_scrape():
    queries = " ".join(expr for _, expr in cd.expressions(DASHBOARD))
    for name in (
        "http_requests_total",
        "response_status_total",
        "http_response_time_seconds_bucket",
        "http_requests_in_flight",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "up",
        "scrape_duration_seconds",
    ):
        assert name in queries
    heatmaps = [p for p in cd.panels(DASHBOARD) if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["targets"][0]["format"] == "heatmap"
    assert "http_response_time_seconds_bucket" in heatmaps[0]["targets"][0]["expr"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("rate(x[$__rate_interval])", "rate(x[1m])"),
        ("rate(x[${__rate_interval}])", "rate(x[1m])"),
        ("increase(x[$__range]) / $__range_s", "increase(x[15m]) / 900"),
        ("avg_over_time(x[$__interval]) * $__interval_ms", "avg_over_time(x[15s]) * 15000"),
    ],
)
def test_grafana_macros_become_durations(expr, expected):
    assert cd.promql(expr) == expected


def test_metric_names_finds_every_selector():
    expr = 'histogram_quantile(0.9, sum by (le) (rate(a_bucket[$__rate_interval]))) / b or {__name__="c"}'
    assert cd.metric_names(expr) == {"a_bucket", "b", "c"}


def test_a_broken_dashboard_is_caught():
    broken = copy.deepcopy(DASHBOARD)
    timeseries = [p for p in cd.panels(broken) if p["type"] == "timeseries"]
    timeseries[0]["targets"][0]["expr"] = "sum(rate(http_requests_total[5m])"
    timeseries[1]["datasource"] = {"type": "prometheus", "uid": "nope"}
    timeseries[2]["targets"][0]["expr"] = "rate(x[$job_interval])"
    timeseries[3]["id"] = timeseries[4]["id"]
    found = "\n".join(cd.problems(broken, UIDS))
    assert "does not parse" in found
    assert "'nope'" in found
    assert "unknown Grafana variable" in found
    assert "used twice" in found


def test_the_latency_panels_draw_exemplars_that_link_by_trace_id():
    latency = [
        p
        for p in cd.panels(DASHBOARD)
        if any("http_response_time_seconds_bucket" in t.get("expr", "") for t in p.get("targets", []))
        and p["type"] in ("timeseries", "heatmap")
    ]
    assert len(latency) == 2
    for panel in latency:
        # One query per panel: the quantiles all read the same buckets, hence the same exemplars.
        assert sum(bool(t.get("exemplar")) for t in panel["targets"]) == 1, panel["title"]
    [source] = [s for path in cd.DATASOURCES.glob("*.yml") for s in yaml.safe_load(path.read_text())["datasources"]]
    [destination] = source["jsonData"]["exemplarTraceIdDestinations"]
    assert destination["name"] == metrics.TRACE_ID
    # Grafana's provisioning expands ${...} from the environment; $$ escapes it.
    assert destination["url"].endswith("/$${__value.raw}")
