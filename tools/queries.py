"""Example PromQL queries for the hello server: the tutorial's second TODO.

``CATALOGUE`` holds each query with the question it answers. ``python
queries.py`` (``make queries``) runs them all against a Prometheus, by default
the native stack's at http://localhost:9090, and prints a table;
``--markdown`` prints docs/queries.md. report.py draws some of them over time.

The windows are one minute: with prometheus.yml's 5 s scrape interval that is
twelve samples, enough for rate() to be steady, and short enough that a
one-minute demo fills it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import promapi

DEFAULT_PROMETHEUS = promapi.EXAMPLE


@dataclass(frozen=True)
class Query:
    name: str
    expr: str
    answers: str  # one sentence: the question this query answers
    unit: str  # how to print a value: "req/s", "ratio", "seconds", "requests"


CATALOGUE: tuple[Query, ...] = (
    Query(
        "tutorial_rate",
        'rate(http_requests_total{path="/hello"}[1m])',
        "The tutorial's own query: how many requests per second /hello served over the last minute.",
        "req/s",
    ),
    Query(
        "request_rate_by_path",
        "sum by (path) (rate(http_requests_total[1m]))",
        'How the traffic splits across routes; unknown paths all count as path="other".',
        "req/s",
    ),
    Query(
        "requests_last_minute",
        "sum(increase(http_requests_total[1m]))",
        "How many requests the server answered in the last minute (extrapolated to the window's edges).",
        "requests",
    ),
    Query(
        "status_rate",
        "sum by (status) (rate(response_status_total[1m]))",
        "How many responses per second went out with each status code.",
        "req/s",
    ),
    Query(
        "status_share",
        "sum by (status) (rate(response_status_total[1m])) / scalar(sum(rate(response_status_total[1m])))",
        "Which share of all responses each status code takes (the app fails 20% with 500 by design).",
        "ratio",
    ),
    Query(
        "error_ratio",
        'sum(rate(response_status_total{status=~"5.."}[1m])) / sum(rate(response_status_total[1m]))',
        "Which share of responses were server errors (5xx): the errors golden signal.",
        "ratio",
    ),
    Query(
        "latency_average",
        'rate(http_response_time_seconds_sum{path="/hello"}[1m])'
        ' / rate(http_response_time_seconds_count{path="/hello"}[1m])',
        "How long a /hello request took on average (sum / count): about half the maximum delay.",
        "seconds",
    ),
    Query(
        "latency_p50",
        'histogram_quantile(0.5, sum by (le) (rate(http_response_time_seconds_bucket{path="/hello"}[1m])))',
        "The median /hello latency, estimated from the histogram (precise to one bucket).",
        "seconds",
    ),
    Query(
        "latency_p90",
        'histogram_quantile(0.9, sum by (le) (rate(http_response_time_seconds_bucket{path="/hello"}[1m])))',
        "The latency 90% of /hello requests stay under.",
        "seconds",
    ),
    Query(
        "latency_p99",
        'histogram_quantile(0.99, sum by (le) (rate(http_response_time_seconds_bucket{path="/hello"}[1m])))',
        "The latency 99% of /hello requests stay under: the tail users notice.",
        "seconds",
    ),
    Query(
        "share_under_250ms",
        'sum(rate(http_response_time_seconds_bucket{path="/hello", le="0.25"}[1m]))'
        ' / sum(rate(http_response_time_seconds_count{path="/hello"}[1m]))',
        "Which share of /hello requests finished within 250 ms (a bucket bound, so exact, not estimated).",
        "ratio",
    ),
    Query(
        "in_flight",
        "http_requests_in_flight",
        "How many requests the server is handling right now: the saturation golden signal.",
        "requests",
    ),
    Query(
        "in_flight_peak",
        "max_over_time(http_requests_in_flight[1m])",
        "The most requests in flight seen at any scrape in the last minute.",
        "requests",
    ),
)

BY_NAME = {q.name: q for q in CATALOGUE}


def format_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "ratio":
        return f"{value:.1%}"
    if unit == "seconds":
        return f"{value * 1000:.1f} ms"
    if unit == "req/s":
        return f"{value:.2f} req/s"
    return f"{value:g}"


def labels_text(metric: dict[str, str]) -> str:
    """The labels that tell series apart; job and instance are the same for all here."""
    shown = {k: v for k, v in metric.items() if k not in ("__name__", "job", "instance")}
    return ", ".join(f'{k}="{v}"' for k, v in sorted(shown.items())) or "-"


def run_all(prometheus_url: str, at: float | None = None) -> list[tuple[Query, list[tuple[str, float]]]]:
    """Every catalogue query's (labels, value) rows, in catalogue order."""
    out = []
    for q in CATALOGUE:
        rows = [(labels_text(r["metric"]), float(r["value"][1])) for r in promapi.query(prometheus_url, q.expr, at)]
        out.append((q, sorted(rows)))
    return out


def format_table(results: Sequence[tuple[Query, Sequence[tuple[str, float]]]], show_expr: bool = False) -> str:
    lines = []
    rows: list[tuple[str, str, str]] = []
    for q, values in results:
        if not values:
            rows.append((q.name, "-", "no data (send traffic: make load)"))
        for i, (labels, value) in enumerate(values):
            rows.append((q.name if i == 0 else "", labels, format_value(value, q.unit)))
    w1 = max(len("query"), *(len(r[0]) for r in rows))
    w2 = max(len("series"), *(len(r[1]) for r in rows))
    lines.append(f"{'query':<{w1}}  {'series':<{w2}}  value")
    lines.append(f"{'-' * w1}  {'-' * w2}  {'-' * 12}")
    lines += [f"{a:<{w1}}  {b:<{w2}}  {c}" for a, b, c in rows]
    if show_expr:
        lines.append("")
        lines += [f"{q.name:<{w1}}  {q.expr}" for q in CATALOGUE]
    return "\n".join(lines)


def markdown() -> str:
    """docs/queries.md, generated from the catalogue so the two cannot drift."""
    out = [
        "# Example queries",
        "",
        "<!-- Generated by `python tools/queries.py --markdown > docs/queries.md`; edit queries.py instead. -->",
        "",
        "PromQL for the hello server's metrics, from `tools/queries.py`. `make queries` runs each against",
        "Prometheus (by default the native stack's, http://localhost:9090) and prints the results;",
        "the end-to-end tests run every one of them against a real Prometheus after traffic and",
        "require data. Paste any of them into the Prometheus graph page (`/graph`) to see it over time.",
        "",
        "Windows are `[1m]`: twelve samples at the stack's 5 s scrape interval.",
        "",
    ]
    for q in CATALOGUE:
        out += [f"## `{q.name}`", "", q.answers, "", "```promql", q.expr, "```", ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the example PromQL queries and print a table.")
    parser.add_argument("--prometheus", default=DEFAULT_PROMETHEUS, help="Prometheus URL (default: %(default)s)")
    parser.add_argument("--exprs", action="store_true", help="also print each query's PromQL")
    parser.add_argument("--markdown", action="store_true", help="print the catalogue as Markdown (docs/queries.md)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
        return 0
    try:
        results = run_all(promapi.base_url(args.prometheus))
    except promapi.PrometheusError as e:
        print(f"queries: {e}", file=sys.stderr)
        return 2
    print(format_table(results, args.exprs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
