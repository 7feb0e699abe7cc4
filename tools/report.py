"""One PNG of the four golden signals over the last minutes, from Prometheus.

``python tools/report.py`` (``make report``) runs range queries from the catalogue
in queries.py against a Prometheus (by default the native stack's) and draws
traffic by status, the error ratio, latency quantiles and requests in flight
into one image, so a person can look instead of read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import promapi
import queries

DEFAULT_OUTPUT = Path("build/report.png")
DEFAULT_WINDOW = "20s"
# Colours by status class; 2xx green, 4xx amber, 5xx red, the rest grey.
STATUS_COLOURS = {"2": "#2ca02c", "3": "#1f77b4", "4": "#ff9f1c", "5": "#d62728"}
QUANTILE_COLOURS = {"latency_p50": "#1f77b4", "latency_p90": "#ff7f0e", "latency_p99": "#d62728"}


def expr(name: str, window: str) -> str:
    """A catalogue query with its [1m] windows replaced by window."""
    return queries.BY_NAME[name].expr.replace("[1m]", f"[{window}]")


def fetch(
    prometheus_url: str, name: str, start: float, end: float, step: float, window: str
) -> list[tuple[dict, list, list]]:
    """(labels, times, values) of each series of a catalogue query over [start, end]."""
    out = []
    for series in promapi.query_range(prometheus_url, expr(name, window), start, end, step):
        times = [dt.datetime.fromtimestamp(float(t), dt.UTC) for t, _ in series["values"]]
        values = [float(v) for _, v in series["values"]]
        out.append((series["metric"], times, values))
    return out


def render(
    prometheus_url: str, start: float, end: float, output: Path, window: str = DEFAULT_WINDOW, title: str | None = None
) -> Path:
    """Draw the four panels for [start, end] into output (a PNG).

    Rates and quantiles use window instead of the catalogue's one minute, so
    a change shows within seconds instead of ramping over a minute; four
    scrapes (20 s at prometheus.yml's 5 s) is the shortest steady choice.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    step = max(1.0, round((end - start) / 240))
    data = {
        name: fetch(prometheus_url, name, start, end, step, window)
        for name in (
            "status_rate",
            "error_ratio",
            "latency_p50",
            "latency_p90",
            "latency_p99",
            "latency_average",
            "in_flight",
        )
    }

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold"})
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True, layout="constrained")
    traffic, errors, latency, saturation = axes.flat

    # Traffic: responses per second, stacked by status.
    series = sorted(data["status_rate"], key=lambda s: s[0].get("status", ""))
    if series:
        traffic.stackplot(
            series[0][1],
            *[[0.0 if math.isnan(v) else v for v in s[2]] for s in series],
            labels=[f"status {s[0].get('status', '?')}" for s in series],
            colors=[STATUS_COLOURS.get(s[0].get("status", "?")[0], "#7f7f7f") for s in series],
            alpha=0.85,
        )
        traffic.legend(loc="upper left", fontsize=8, ncols=len(series))
        _headroom(traffic)
    traffic.set_title("Traffic: responses per second, by status")
    traffic.set_ylabel("req/s")

    # Errors: the 5xx share.
    for _, times, values in data["error_ratio"]:
        errors.plot(
            times,
            values,
            color=STATUS_COLOURS["5"],
            linewidth=1.8,
            label=f"5xx / all responses (last {_last(values):.1%})",
        )
    errors.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    errors.set_ylim(0, 1)
    errors.set_title("Errors: share of responses that are 5xx")
    errors.set_ylabel("error ratio")
    if data["error_ratio"]:
        errors.legend(loc="upper left", fontsize=8)

    # Latency: quantiles from the histogram, and the exact average.
    for name, colour in QUANTILE_COLOURS.items():
        for _, times, values in data[name]:
            latency.plot(times, values, color=colour, linewidth=1.8, label=name.removeprefix("latency_"))
    for _, times, values in data["latency_average"]:
        latency.plot(times, values, color="#555555", linewidth=1.2, linestyle="--", label="average")
    latency.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 1000:.0f} ms"))
    latency.set_ylim(bottom=0)
    _headroom(latency)
    latency.set_title("Latency of /hello: quantiles estimated from the histogram")
    if any(data[n] for n in (*QUANTILE_COLOURS, "latency_average")):
        latency.legend(loc="upper left", fontsize=8, ncols=4)

    # Saturation: requests in flight at each scrape.
    for _, times, values in data["in_flight"]:
        peak = max((v for v in values if not math.isnan(v)), default=0)
        saturation.plot(
            times, values, color="#9467bd", linewidth=1.5, drawstyle="steps-post", label=f"in flight (peak {peak:g})"
        )
        saturation.fill_between(times, values, step="post", color="#9467bd", alpha=0.25)
    saturation.set_title("Saturation: requests in flight")
    saturation.set_ylabel("requests")
    saturation.set_ylim(bottom=0)
    if data["in_flight"]:
        saturation.legend(loc="upper left", fontsize=8)
        _headroom(saturation)

    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.set_xlim(dt.datetime.fromtimestamp(start, dt.UTC), dt.datetime.fromtimestamp(end, dt.UTC))
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=4, maxticks=7, tz=dt.UTC))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=dt.UTC))
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    for ax in axes[1]:
        ax.set_xlabel("time (UTC)")
    first, last = dt.datetime.fromtimestamp(start, dt.UTC), dt.datetime.fromtimestamp(end, dt.UTC)
    span = f"{first:%Y-%m-%d %H:%M:%S} to {last:%H:%M:%S} UTC; rates over [{window}], one point every {step:g} s"
    fig.suptitle(title or f"hello server: the four golden signals, from Prometheus\n{span}", fontsize=11)

    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def _last(values: Sequence[float]) -> float:
    return next((v for v in reversed(values) if not math.isnan(v)), math.nan)


def _headroom(ax: object) -> None:
    """Leave the top fifth of a panel free for its legend."""
    bottom, top = ax.get_ylim()  # type: ignore[attr-defined]
    ax.set_ylim(bottom, top * 1.25)  # type: ignore[attr-defined]


def _unwritable(path: Path) -> str | None:
    """Why a file could not be written at path (its folder is created if missing), or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"{path.parent} is not a directory"
    except OSError as e:
        return f"cannot create {path.parent}: {e.strerror}"
    if path.is_dir():
        return "is a directory"
    if not os.access(path.parent, os.W_OK):
        return f"{path.parent} is not writable"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the golden signals of the last minutes into one PNG.")
    parser.add_argument(
        "--prometheus", default=queries.DEFAULT_PROMETHEUS, help="Prometheus URL (default: %(default)s)"
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how far back to look (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write (default: %(default)s)")
    parser.add_argument("--window", default=DEFAULT_WINDOW, help="range of rate() and quantiles (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        parser.error("--minutes must be positive")
    # Before querying: a PNG that cannot be written would lose the work.
    if problem := _unwritable(args.output):
        print(f"report: --output {args.output}: {problem}; choose another path", file=sys.stderr)
        return 2
    end = time.time()
    try:
        path = render(promapi.base_url(args.prometheus), end - args.minutes * 60, end, args.output, args.window)
    except promapi.PrometheusError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(f"report: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
