"""Golden-signal metrics for any ``http.server`` handler.

``HTTPMetrics`` owns the metric definitions, registered in a registry you pass
in. ``instrument(handler_class, metrics)`` returns a subclass of your
``BaseHTTPRequestHandler`` that records, for every response it sends:

- ``http_requests_total{path}``            traffic
- ``response_status_total{status}``        errors (the tutorial's ``response_status``)
- ``http_response_time_seconds{path}``     latency (a histogram)
- ``http_requests_in_flight``              saturation

Every request the handler answers gets an id: the trace id of a valid
incoming W3C ``traceparent`` header, else a new random one. The handler has it as ``self.trace_id`` (for
your access log), sends it back in an ``X-Request-Id`` header, and the latency
histogram keeps, per bucket, the id, duration and time of the latest request
that landed there: an exemplar, exposed in the OpenMetrics format only.

The status comes from ``send_response``, which the standard library also calls
for its own errors (400, 414, 501 via ``send_error``), so those are counted
too. Timing starts when the request line has been read, not when the
connection starts waiting for it: an idle keep-alive connection is not latency.

Why ``HTTPMetrics`` is a custom collector rather than prometheus_client's
``Counter``, ``Histogram`` and ``Gauge``: through those a request took six
separately locked updates in generic code (``Histogram.observe`` alone loops
over the buckets under two locks), 40,000 CPU instructions per request
(counted with callgrind), and the instrumented server answered 0.82 as many
requests/s. Now the counts cost about 11,400 instructions, most of them the
three handler hooks: joining and leaving a set of requests in flight, and one
short critical section under one lock to count the response. The request id
and the exemplar add about 8,500: the traceparent lookup ~1,800, the id
~2,200, send_header ~3,400, the exemplar ~1,000 (hello_server.py earns them
back in the headers every response sends). A scrape copies the numbers under
the same lock and formats them with the library's own metric families, so the
exposition text is unchanged. Every count stays exact with the GIL and without
it: no shared number is updated outside the lock, and set.add/discard are
atomic.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

#: The path label of every request to a path the server has no route for:
#: 10,000 random URLs must not become 10,000 series.
OTHER_PATH = "other"
#: The status label of a code outside the HTTP registry (a handler bug).
OTHER_STATUS = "other"
#: The histogram's upper bounds: prometheus_client's defaults, 5 ms to 10 s, and +Inf.
BUCKETS = tuple(Histogram.DEFAULT_BUCKETS)

#: The exemplar label that carries a request's id; Grafana links ``trace_id`` by default.
TRACE_ID = "trace_id"
#: The response header that tells the client its request's id.
REQUEST_ID_HEADER = "X-Request-Id"

_KNOWN_STATUSES = frozenset(int(s) for s in HTTPStatus)

# W3C Trace Context: version (ff is invalid), trace id and parent id (neither
# all zeros), flags; lower-case hex only. The length is checked separately.
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_V00_LENGTH = 55


def parse_traceparent(value: str) -> str | None:
    """The trace id of a valid W3C ``traceparent`` header value, else None.

    Version 00 is exactly 55 characters. A later version may append fields,
    so it is read as version 00 when the 55 characters are followed by the
    end or a dash, as the specification asks.
    """
    value = value.strip(" \t")
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    if len(value) != _V00_LENGTH and (value.startswith("00") or value[_V00_LENGTH] != "-"):
        return None
    return match.group(1)


# Request ids need to be unique, not secret. os.urandom(16).hex() took 1.6 µs
# here (a system call) against 0.66 µs for this, measured with timeit.
# callgrind counts the other way round (1,400 instructions against 2,260) as it
# does not see the kernel. Not the `random` module's generator: a program
# that seeds it would repeat its ids.
_ids = random.Random()
# A forked child would otherwise hand out its parent's ids.
os.register_at_fork(after_in_child=_ids.seed)


def new_trace_id() -> str:
    """A random 128-bit id in the form of a W3C trace id (32 lower-case hex digits)."""
    return _ids.getrandbits(128).to_bytes(16, "big").hex()


class _Series:
    """One path's latency histogram; its count is also the path's request count."""

    __slots__ = ("buckets", "exemplars", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(BUCKETS)  # per bucket, not cumulative: one increment per response
        self.sum = 0.0
        # Per bucket, (trace id, seconds, Unix time) of the latest request in it.
        self.exemplars: list[tuple[str, float, float] | None] = [None] * len(BUCKETS)


class HTTPMetrics:
    """The four golden-signal metrics for a fixed set of routes, as one collector."""

    def __init__(
        self,
        registry: CollectorRegistry,
        routes: Iterable[str],
        unobserved: Iterable[str] = ("/metrics",),
    ) -> None:
        self.routes = frozenset(routes)
        # Counting the scrape itself would skew the error ratio and the rate.
        self.unobserved = frozenset(unobserved)
        # The requests in flight, by who handles them; set.add and set.discard
        # are atomic, with the GIL and without it, and cheaper than a lock.
        self._active: set[object] = set()
        # Every read and every write of the counts below holds this lock.
        self._lock = threading.Lock()
        # Pre-creating the routes and the two statuses /hello sends makes their
        # series exist at 0 from the first scrape, so rate() sees the first request.
        self._series = {label: _Series() for label in [*sorted(self.routes - self.unobserved), OTHER_PATH]}
        # Route -> path label (None: not observed); every other route is OTHER_PATH.
        # One dict lookup serves path_label() and the hot path in start().
        self._labels: dict[str, str | None] = {r: r for r in self.routes} | dict.fromkeys(self.unobserved)
        self._statuses = {"200": 0, "500": 0}
        # Status code -> label. Read without the lock (a dict lookup is atomic,
        # and an entry, once there, never changes); written under it.
        self._status_labels = {200: "200", 500: "500"}
        registry.register(self)

    def path_label(self, path: str | None) -> str | None:
        """The bounded path label of a request target, or None if it is not observed."""
        if path is None:
            return OTHER_PATH
        return self._labels.get(path.partition("?")[0], OTHER_PATH)

    # --- recording ----------------------------------------------------------

    def start(self, path: str | None, request: object) -> str | None:
        """A request for path has begun: count it in flight and return its path label.

        request is whatever identifies it until finish() (its handler). None,
        and nothing counted, if the path is not observed.
        """
        # path_label()'s lookup, inlined: a call is 700 instructions, 0.4% of a request.
        label = OTHER_PATH if path is None else self._labels.get(path.partition("?")[0], OTHER_PATH)
        if label is not None:
            self._active.add(request)
        return label

    def finish(
        self, request: object, path_label: str, status: int | None, seconds: float, trace_id: str | None = None
    ) -> None:
        """A request has ended: record its response, if it sent one, and take it out of flight.

        request is what start() was given, or None for one start() did not
        count. The response is counted before the request leaves the
        in-flight count, so a scrape that reads in-flight 0 after a client's
        last response also sees that response counted (loadgen's audit relies on it).
        trace_id, if given, becomes its bucket's exemplar: callers pass only
        ids that are safe to expose (parse_traceparent's or new_trace_id's).
        """
        if status is not None:
            series = self._series[path_label]
            # The first bound >= seconds, as prometheus_client's Histogram.observe picks it.
            bucket = bisect_left(BUCKETS, seconds)
            status_label = self._status_labels.get(status) or self._new_status_label(status)
            exemplar = None if trace_id is None else (trace_id, seconds, time.time())
            with self._lock:
                series.buckets[bucket] += 1
                series.sum += seconds
                if exemplar is not None:
                    series.exemplars[bucket] = exemplar
                self._statuses[status_label] += 1
        self._active.discard(request)

    def observe(self, path_label: str, status: int, seconds: float, trace_id: str | None = None) -> None:
        """Record one response that was sent."""
        self.finish(None, path_label, status, seconds, trace_id)

    def _new_status_label(self, status: int) -> str:
        code = int(status)  # send_error passes HTTPStatus members, whose str() varies by Python version
        label = str(code) if code in _KNOWN_STATUSES else OTHER_STATUS
        with self._lock:
            self._statuses.setdefault(label, 0)
            if label != OTHER_STATUS:  # real codes are a bounded set; bogus ones are not
                self._status_labels[code] = label
        return label

    # --- exposition: prometheus_client's collector protocol ------------------

    def describe(self) -> list[Metric]:
        # The registry takes the names from here, and refuses a clash.
        return self._families({}, {}, 0)

    def collect(self) -> list[Metric]:
        # Copy under the lock, format outside it: requests never wait for a scrape's text.
        # In-flight first: a request that has left it is already counted.
        in_flight = len(self._active)
        with self._lock:
            series = {label: (list(s.buckets), s.sum, list(s.exemplars)) for label, s in self._series.items()}
            statuses = dict(self._statuses)
        return self._families(series, statuses, in_flight)

    @staticmethod
    def _families(
        series: dict[str, tuple[list[int], float, list[tuple[str, float, float] | None]]],
        statuses: dict[str, int],
        in_flight: int,
    ) -> list[Metric]:
        requests = CounterMetricFamily("http_requests_total", "HTTP requests answered, by route.", labels=["path"])
        latency = HistogramMetricFamily(
            "http_response_time_seconds",
            "Time from reading the request line to the end of the response, by route.",
            labels=["path"],
        )
        for label, (counts, total, exemplars) in series.items():
            cumulative: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            running = 0
            for bound, n, exemplar in zip(BUCKETS, counts, exemplars, strict=True):
                running += n
                if exemplar is None:
                    cumulative.append((floatToGoString(bound), float(running)))
                else:
                    # Only the OpenMetrics exposition writes it; plain text drops it.
                    trace_id, seconds, timestamp = exemplar
                    cumulative.append(
                        (floatToGoString(bound), float(running), Exemplar({TRACE_ID: trace_id}, seconds, timestamp))
                    )
            requests.add_metric([label], float(running))
            latency.add_metric([label], cumulative, total)
        responses = CounterMetricFamily("response_status", "HTTP responses sent, by status code.", labels=["status"])
        for label, n in statuses.items():
            responses.add_metric([label], float(n))
        saturation = GaugeMetricFamily(
            "http_requests_in_flight", "HTTP requests being handled right now.", value=float(in_flight)
        )
        return [requests, responses, latency, saturation]


class InstrumentedHandler(BaseHTTPRequestHandler):
    """Mixin that records every response of a ``BaseHTTPRequestHandler``.

    Use it through ``instrument()``, which puts it in front of your handler.
    A response is recorded once, with the last status passed to
    ``send_response`` (a 500 sent after a failed 200 wins), when
    ``handle_one_request`` returns. A request that sends no response at all
    (the client hung up, or the handler raised and your server dropped the
    connection) is not recorded: no client saw a status.

    Every response it sends (HTTP/0.9 ones have no headers) carries an
    ``X-Request-Id`` header with the request's id,
    ``self.trace_id``, which is also its latency bucket's exemplar: the trace
    id of a valid ``traceparent`` header, else a new one. An invalid header is
    ignored, so ``self.trace_id`` is always 32 hex digits, safe to log.
    """

    metrics: HTTPMetrics

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Each zero-argument super() call builds a super object and searches
        # the MRO, about 700 CPU instructions in CPython 3.11 (3.12 caches
        # it): 1% of the fast path for three calls per request. So look up
        # the methods this class wraps once, when instrument() makes the class.
        after = super()
        cls._handle_one_request = after.handle_one_request  # type: ignore[attr-defined]
        cls._parse_request = after.parse_request  # type: ignore[attr-defined]
        cls._send_response = after.send_response  # type: ignore[attr-defined]

    def handle_one_request(self) -> None:
        self._started: float | None = None
        #: This request's id, once it has one: from its traceparent header, or new.
        self.trace_id: str | None = None
        # Once the request has started: its path label, and it is in flight
        # until finish(); None for a route that is not observed.
        self._path_label: str | None = None
        self._status: int | None = None
        try:
            self._handle_one_request()
        finally:
            if self._path_label is not None:
                self.metrics.finish(
                    self, self._path_label, self._status, time.perf_counter() - self._started, self.trace_id
                )

    def parse_request(self) -> bool:
        self._started = time.perf_counter()
        # A malformed request line is answered (400) before self.path is set;
        # don't let the previous request's path on this connection leak in.
        self.path = None  # type: ignore[assignment]
        ok = self._parse_request()
        self._path_label = self.metrics.start(self.path, self)
        # get() first: most requests have no traceparent, and get_all() costs more.
        if ok and self.headers.get("traceparent") is not None:
            incoming = self.headers.get_all("traceparent")
            # Two traceparent headers contradict each other: W3C says start afresh.
            if len(incoming) == 1:
                self.trace_id = parse_traceparent(incoming[0])
        return ok

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        if self._started is None:
            # The standard library answers an over-long request line (414)
            # before parse_request runs.
            self._started = time.perf_counter()
            self._path_label = self.metrics.start(None, self)
        if self.trace_id is None:
            # new_trace_id(), inlined: the call alone is ~400 instructions, 0.2% of a request.
            self.trace_id = _ids.getrandbits(128).to_bytes(16, "big").hex()
        self._send_response(code, message)
        self.send_header(REQUEST_ID_HEADER, self.trace_id)


def instrument(handler_class: type[BaseHTTPRequestHandler], metrics: HTTPMetrics) -> type[BaseHTTPRequestHandler]:
    """Return ``handler_class`` with every response recorded in ``metrics``."""
    return type(
        f"Instrumented{handler_class.__name__}",
        (InstrumentedHandler, handler_class),
        {"metrics": metrics},
    )
