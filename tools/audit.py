"""The audit: did the server count exactly what the load generator saw?

``audited_run`` runs a loadgen plan between two scrapes of the server's
/metrics (and, given a Prometheus, two instant queries of the same counters
after its scrapes), then compares the deltas of ``http_requests_total{path}``,
``response_status_total{status}`` and the histogram count with the client's
own counts: they must be equal. It also sets the histogram's quantile
estimates beside the client's measured quantiles, with the bucket of each.

With several replicas the counts are summed over all of them: directly over
each replica's /metrics, and in Prometheus over the targets that are the
client's servers (or every target of a job, when the client's addresses are
not the ones Prometheus scrapes, as behind Docker's published ports).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import promapi
from traffic import (
    LATENCY,
    QUANTILES,
    REQUESTS,
    STATUSES,
    Plan,
    Progress,
    Stats,
    Target,
    UsageError,
    _ms,
    quantile,
    run,
)

Sample = tuple[str, frozenset[tuple[str, str]]]


def parse_exposition(text: str) -> dict[Sample, float]:
    """{(sample name, labels): value} of a text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


class ScrapeError(OSError):
    """A /metrics scrape failed; the message names the URL."""


def scrape(url: str, timeout: float = 10.0) -> dict[Sample, float]:
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        raise ScrapeError(f"cannot scrape {url}: HTTP {e.code}; is it the server's /metrics? (--metrics-url)") from None
    except urllib.error.URLError as e:
        raise ScrapeError(f"cannot scrape {url}: {getattr(e.reason, 'strerror', None) or e.reason}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScrapeError(f"cannot scrape {url}: {e}") from None
    try:
        return parse_exposition(text)
    except ValueError as e:
        raise ScrapeError(f"{url} is not a Prometheus exposition ({e}); is it the server's /metrics?") from None


def series(samples: Mapping[Sample, float], name: str, label: str) -> dict[str, float]:
    """{value of label: sample value} for every sample of one name."""
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name and label in dict(labels)}


def buckets(samples: Mapping[Sample, float], path: str) -> list[tuple[float, float]]:
    """Sorted (upper bound, cumulative count) of the latency histogram of path."""
    out = []
    for (n, labels), v in samples.items():
        d = dict(labels)
        if n == LATENCY + "_bucket" and d.get("path") == path:
            out.append((float(d["le"]), v))
    return sorted(out)


def histogram_quantile(q: float, cumulative: Sequence[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs."""
    if not cumulative or cumulative[-1][1] == 0:
        return float("nan")
    total = cumulative[-1][1]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for i, (bound, count) in enumerate(cumulative):
        if count >= rank:
            if math.isinf(bound):
                # Prometheus answers the largest finite bound.
                return cumulative[i - 1][0] if i else float("nan")
            if i == 0 and bound <= 0:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return float("nan")


def bucket_of(value: float, bounds: Sequence[float]) -> tuple[float, float]:
    """The (lower, upper] bucket a value falls in."""
    lower = 0.0
    for bound in bounds:
        if value <= bound:
            return lower, bound
        lower = bound
    return lower, math.inf


def _bucket_text(b: tuple[float, float]) -> str:
    return f"({b[0]:g}, {b[1]:g}]"


@dataclass
class Check:
    what: str
    expected: int
    observed: float
    slack: int = 0  # requests whose fate on the server is unknown

    @property
    def ok(self) -> bool:
        return self.expected <= self.observed <= self.expected + self.slack

    def row(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        if self.ok and self.slack and self.observed != self.expected:
            verdict = "ok within timeouts/errors"
        return f"  {self.what:<60} {self.expected:>9} {_count(self.observed):>9}  {verdict}"


def _count(v: float) -> str:
    return str(int(v)) if v == int(v) else f"{v:g}"


def path_label(samples: Mapping[Sample, float], path: str) -> str:
    """The path label the server gives path: itself if it has a series, else its catch-all."""
    paths = series(samples, REQUESTS, "path")
    return path if path in paths else "other"


def count_checks(
    stats: Stats, before: Mapping[Sample, float], after: Mapping[Sample, float], source: str
) -> list[Check]:
    """The exact comparisons: each server-side delta against the client's count."""
    # A request that timed out or broke may or may not have been answered
    # (and counted) by the server: it widens the accepted range, it never
    # hides a miscount of the requests that were answered.
    slack = stats.failures
    label = path_label(after, stats.plan.target.path)
    answered = stats.responses

    def delta(name: str, by: str) -> dict[str, float]:
        a, b = series(after, name, by), series(before, name, by)
        return {k: a[k] - b.get(k, 0.0) for k in a}

    requests = delta(REQUESTS, "path")
    checks = [
        Check(f'{source}: {REQUESTS}{{path="{label}"}}', answered, requests.get(label, 0.0), slack),
        Check(f"{source}: {REQUESTS}, all paths", answered, sum(requests.values()), slack),
        Check(
            f'{source}: {LATENCY}_count{{path="{label}"}}',
            answered,
            delta(LATENCY + "_count", "path").get(label, 0),
            slack,
        ),
    ]
    statuses = delta(STATUSES, "status")
    seen = {str(k): v for k, v in stats.statuses.items()}
    for code in sorted(set(seen) | {k for k, v in statuses.items() if v}):
        checks.append(
            Check(f'{source}: {STATUSES}{{status="{code}"}}', seen.get(code, 0), statuses.get(code, 0.0), slack)
        )
    return checks


def quantile_rows(stats: Stats, before: Mapping[Sample, float], after: Mapping[Sample, float]) -> list[dict[str, Any]]:
    """The histogram's quantile estimates beside the client's measurements."""
    label = path_label(after, stats.plan.target.path)
    b = dict(buckets(before, label))
    cumulative = [(le, v - b.get(le, 0.0)) for le, v in buckets(after, label)]
    bounds = [le for le, _ in cumulative if not math.isinf(le)]
    measured = sorted(stats.service_times)
    rows = []
    for q in QUANTILES:
        estimate = histogram_quantile(q, cumulative)
        client = quantile(measured, q)
        rows.append(
            {
                "quantile": q,
                "histogram": estimate,
                "client": client,
                "difference": estimate - client,
                "client_bucket": list(bucket_of(client, bounds)) if measured else None,
                "histogram_bucket": list(bucket_of(estimate, bounds)) if not math.isnan(estimate) else None,
            }
        )
    return rows


class Prometheus:
    """The few calls of Prometheus' HTTP API the audit needs."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = promapi.base_url(url)
        self.timeout = timeout

    def query(self, expr: str) -> list[dict[str, Any]]:
        return promapi.query(self.url, expr, timeout=self.timeout)

    def selector(self, targets: Sequence[Target], job: str | None, deadline: float) -> str:
        """The label matcher of the series to audit: every target of job, or the targets' own instances."""
        if job:
            expr = f"up{{job={_quote(job)}}}"
            while not self.query(expr):
                if time.time() > deadline:
                    raise UsageError(f"Prometheus at {self.url} has no targets of job {job!r}")
                time.sleep(0.1)
            return f"job={_quote(job)}"
        instances = sorted({self.instance_of(t, deadline) for t in targets})
        if len(instances) == 1:
            return f"instance={_quote(instances[0])}"
        return f"instance=~{_quote('|'.join(re.escape(i) for i in instances))}"

    def instance_of(self, target: Target, deadline: float) -> str:
        """The instance label under which Prometheus scrapes target's server.

        The same host and port (any loopback name for a loopback target), or
        else the one instance with the same port: in Docker, Prometheus
        scrapes app:8080 while the client sends to localhost:8080. Waits
        (until wall time deadline) for the first scrape: a fresh Prometheus
        takes a few seconds to discover its targets.
        """
        loopback = {"localhost", "127.0.0.1", "::1"}
        while True:
            same_port, candidates = set(), set()
            for item in self.query("up"):
                instance = item["metric"].get("instance", "")
                host, _, port = instance.rpartition(":")
                host = host.strip("[]")
                if port != str(target.port):
                    continue
                same_port.add(instance)
                if host == target.host or (host in loopback and _is_loopback(target.host)):
                    candidates.add(instance)
            if not candidates and len(same_port) == 1:
                candidates = same_port
            if len(candidates) == 1:
                return candidates.pop()
            if len(candidates) > 1:
                raise UsageError(f"Prometheus at {self.url} scrapes {target.netloc} as {', '.join(sorted(candidates))}")
            if time.time() > deadline:
                raise UsageError(f"Prometheus at {self.url} does not scrape {target.netloc}")
            time.sleep(0.1)

    def wait_for_scrape(self, selector: str, after: float, deadline: float) -> float:
        """Wait until Prometheus has scraped every target of selector after wall time after.

        Returns the time of the oldest of those scrapes.
        """
        expr = f"timestamp(up{{{selector}}})"
        while True:
            times = [float(item["value"][1]) for item in self.query(expr)]
            if times and min(times) > after:
                return min(times)
            if time.time() > deadline:
                raise TimeoutError(f"Prometheus did not scrape {{{selector}}} in time")
            time.sleep(0.1)

    def samples(self, selector: str) -> dict[Sample, float]:
        """The audited counters as Prometheus last scraped them, summed over the targets of selector."""
        out: dict[Sample, float] = {}
        for name in (REQUESTS, STATUSES, LATENCY + "_count"):
            for item in self.query(f"sum without (instance, job) ({name}{{{selector}}})"):
                labels = {k: v for k, v in item["metric"].items() if k != "__name__"}
                out[(name, frozenset(labels.items()))] = float(item["value"][1])
        return out

    def targets(self, selector: str) -> int:
        return len(self.query(f"up{{{selector}}}"))


def _quote(value: str) -> str:
    """A PromQL string literal."""
    return json.dumps(value)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def scrape_sum(urls: Sequence[str]) -> dict[Sample, float]:
    """Every sample summed over the expositions at urls (replicas of one service)."""
    total: dict[Sample, float] = {}
    for url in urls:
        for sample, value in scrape(url).items():
            total[sample] = total.get(sample, 0.0) + value
    return total


def settled_scrape(urls: Sequence[str], deadline: float) -> dict[Sample, float]:
    """Scrape (and sum over urls) until two scrapes in a row agree.

    The server counts a response just after sending it, so the client can
    hold its last response a moment before the server has counted it.
    """
    previous = scrape_sum(urls)
    while True:
        time.sleep(0.05)
        current = scrape_sum(urls)
        if current_counts(current) == current_counts(previous) or time.monotonic() > deadline:
            return current
        previous = current


def current_counts(samples: Mapping[Sample, float]) -> dict[Sample, float]:
    return {k: v for k, v in samples.items() if k[0] in (REQUESTS, STATUSES, LATENCY + "_count")}


@dataclass
class Audit:
    checks: list[Check]
    quantiles: list[dict[str, Any]]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def exact(self) -> bool:
        return all(c.observed == c.expected for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "exact": self.exact,
            "checks": [dataclasses.asdict(c) | {"ok": c.ok} for c in self.checks],
            "quantiles": self.quantiles,
            "notes": self.notes,
        }


def format_audit(audit: Audit) -> str:
    out = ["audit: the server's counters against what this client saw", ""]
    out.append(f"  {'counter (delta over the run)':<60} {'client':>9} {'counted':>9}")
    out += [c.row() for c in audit.checks]
    if audit.quantiles:
        out += [
            "",
            f"  {'latency quantile':<16}{'histogram':>12}{'client':>12}{'diff':>12}  buckets (client / histogram)",
        ]
        for r in audit.quantiles:
            if r["client_bucket"] is None or r["histogram_bucket"] is None:
                continue
            same = "same bucket" if r["client_bucket"] == r["histogram_bucket"] else "different buckets"
            out.append(
                f"  p{r['quantile'] * 100:<15g}{_ms(r['histogram']):>12}{_ms(r['client']):>12}"
                f"{r['difference'] * 1000:>+9.1f} ms  {_bucket_text(r['client_bucket'])} / "
                f"{_bucket_text(r['histogram_bucket'])}, {same}"
            )
        out.append("  (the client measures from writing the request to the end of the response)")
    out += [f"  note: {n}" for n in audit.notes]
    verdict = "PASS, exact" if audit.exact else ("PASS within timeouts/errors" if audit.ok else "FAIL: counts differ")
    out += ["", f"audit: {verdict}"]
    return "\n".join(out)


def audited_run(
    plan: Plan,
    progress: Progress | None = None,
    metrics_url: str | None = None,
    prometheus_url: str | None = None,
    scrape_timeout: float = 60.0,
    log: Callable[[str], None] = lambda _: None,
    interruptible: bool = False,
    job: str | None = None,
) -> tuple[Stats, Audit]:
    """Run plan between two scrapes of the server(s) (and of Prometheus) and compare.

    The direct scrapes sum /metrics over every target of the plan (metrics_url
    replaces them for a single target). Through Prometheus the counters are
    summed over the targets' own instances, or over every target of job.
    """
    if metrics_url and plan.replicas:
        raise UsageError("--metrics-url names one server; with several URLs each one's /metrics is scraped")
    metrics_urls = [metrics_url] if metrics_url else [t.sibling("/metrics") for t in plan.targets]
    selector = prom_before = None
    what = f"job {job!r}" if job else ", ".join(t.netloc for t in plan.targets)
    # Nothing is sent yet: a /metrics or Prometheus URL that does not work
    # here is a bad argument, not a failed audit.
    try:
        prom = Prometheus(prometheus_url) if prometheus_url else None
        before = settled_scrape(metrics_urls, time.monotonic() + 5)
        if prom:
            log(f"loadgen: waiting for Prometheus at {prom.url} to scrape {what} before the run")
            selector = prom.selector(plan.targets, job, time.time() + scrape_timeout)
            prom.wait_for_scrape(selector, time.time(), time.time() + scrape_timeout)
            prom_before = prom.samples(selector)
    except (ScrapeError, promapi.PrometheusError) as e:
        raise UsageError(f"{e} (nothing was sent)") from None
    stats = run(plan, progress, interruptible)
    after = settled_scrape(metrics_urls, time.monotonic() + 5)
    settled_at = time.time()
    checks = count_checks(stats, before, after, "/metrics")
    notes = []
    if stats.failures:
        notes.append(
            f"{stats.failures} requests timed out or failed: the server may or may not have counted them, "
            "so each count may exceed the client's by up to that many"
        )
    if len(metrics_urls) > 1:
        notes.append(f"/metrics: summed over {len(metrics_urls)} servers")
    if prom and selector:
        log(f"loadgen: waiting for Prometheus to scrape {what} after the run")
        prom.wait_for_scrape(selector, settled_at, time.time() + scrape_timeout)
        checks += count_checks(stats, prom_before or {}, prom.samples(selector), "Prometheus")
        count = prom.targets(selector)
        if count > 1:
            notes.append(f"Prometheus: summed over {count} targets" + (f" of job {job!r}" if job else ""))
    return stats, Audit(checks, quantile_rows(stats, before, after), notes)
