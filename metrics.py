"""Golden-signal metrics for any ``http.server`` handler.

``HTTPMetrics`` owns the metric definitions, registered in a registry you pass
in. ``instrument(handler_class, metrics)`` returns a subclass of your
``BaseHTTPRequestHandler`` that records, for every response it sends:

- ``http_requests_total{path}``            traffic
- ``response_status_total{status}``        errors (the tutorial's ``response_status``)
- ``http_response_time_seconds{path}``     latency (a histogram)
- ``http_requests_in_flight``              saturation

The status comes from ``send_response``, which the standard library also calls
for its own errors (400, 414, 501 via ``send_error``), so those are counted
too. Timing starts when the request line has been read, not when the
connection starts waiting for it: an idle keep-alive connection is not latency.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The tutorial has no *_created series and they double the series count.
# The switch is global in prometheus_client and read at collection time.
disable_created_metrics()

#: The path label of every request to a path the server has no route for:
#: 10,000 random URLs must not become 10,000 series.
OTHER_PATH = "other"
#: The status label of a code outside the HTTP registry (a handler bug).
OTHER_STATUS = "other"

_KNOWN_STATUSES = frozenset(int(s) for s in HTTPStatus)


class HTTPMetrics:
    """The four golden-signal metrics for a fixed set of routes."""

    def __init__(
        self,
        registry: CollectorRegistry,
        routes: Iterable[str],
        unobserved: Iterable[str] = ("/metrics",),
    ) -> None:
        self.routes = frozenset(routes)
        # Counting the scrape itself would skew the error ratio and the rate.
        self.unobserved = frozenset(unobserved)
        self.requests = Counter("http_requests_total", "HTTP requests answered, by route.", ["path"], registry=registry)
        self.statuses = Counter(
            "response_status", "HTTP responses sent, by status code.", ["status"], registry=registry
        )
        self.latency = Histogram(
            "http_response_time_seconds",
            "Time from reading the request line to the end of the response, by route.",
            ["path"],
            registry=registry,
        )
        self.in_flight = Gauge("http_requests_in_flight", "HTTP requests being handled right now.", registry=registry)
        # labels() takes a lock and builds a tuple on every call; binding each
        # child once keeps the hot path to dictionary look-ups. Pre-creating the
        # routes and the two statuses /hello sends also makes their series
        # exist at 0 from the first scrape, so rate() sees the first request.
        self._by_path = {
            p: (self.requests.labels(p), self.latency.labels(p)) for p in (self.routes - self.unobserved) | {OTHER_PATH}
        }
        self._by_status = {code: self.statuses.labels(str(code)) for code in (200, 500)}

    def path_label(self, path: str | None) -> str | None:
        """The bounded path label of a request target, or None if it is not observed."""
        if path is None:
            return OTHER_PATH
        route = path.partition("?")[0]
        if route in self.unobserved:
            return None
        return route if route in self.routes else OTHER_PATH

    def observe(self, path_label: str, status: int, seconds: float) -> None:
        """Record one response that was sent."""
        requests, latency = self._by_path[path_label]
        requests.inc()
        latency.observe(seconds)
        child = self._by_status.get(status)
        if child is None:
            label = str(status) if status in _KNOWN_STATUSES else OTHER_STATUS
            # A benign race: two threads may both bind the same child, and
            # labels() returns the same object to both.
            child = self._by_status[status] = self.statuses.labels(label)
        child.inc()


class InstrumentedHandler(BaseHTTPRequestHandler):
    """Mixin that records every response of a ``BaseHTTPRequestHandler``.

    Use it through ``instrument()``, which puts it in front of your handler.
    A response is recorded once, with the last status passed to
    ``send_response`` (a 500 sent after a failed 200 wins), when
    ``handle_one_request`` returns. A request that sends no response at all
    (the client hung up, or the handler raised and your server dropped the
    connection) is not recorded: no client saw a status.
    """

    metrics: HTTPMetrics

    def handle_one_request(self) -> None:
        self._status: int | None = None
        self._started: float | None = None
        self._path_label: str | None = None
        self._in_flight = False
        try:
            super().handle_one_request()
        finally:
            if self._status is not None and self._path_label is not None:
                self.metrics.observe(self._path_label, self._status, time.perf_counter() - self._started)
            # Last, so a scrape that reads in-flight 0 after a client's final
            # response also sees that response counted (the audit relies on it).
            if self._in_flight:
                self.metrics.in_flight.dec()

    def parse_request(self) -> bool:
        self._started = time.perf_counter()
        # A malformed request line is answered (400) before self.path is set;
        # don't let the previous request's path on this connection leak in.
        self.path = None  # type: ignore[assignment]
        ok = super().parse_request()
        self._path_label = self.metrics.path_label(self.path)
        if self._path_label is not None:
            self.metrics.in_flight.inc()
            self._in_flight = True
        return ok

    def send_response(self, code: int, message: str | None = None) -> None:
        # send_error passes HTTPStatus members, whose str() differs across
        # Python versions; int() is stable.
        self._status = int(code)
        if self._started is None:
            # The standard library answers an over-long request line (414)
            # before parse_request runs.
            self._started = time.perf_counter()
            self._path_label = OTHER_PATH
        super().send_response(code, message)


def instrument(handler_class: type[BaseHTTPRequestHandler], metrics: HTTPMetrics) -> type[BaseHTTPRequestHandler]:
    """Return ``handler_class`` with every response recorded in ``metrics``."""
    return type(
        f"Instrumented{handler_class.__name__}",
        (InstrumentedHandler, handler_class),
        {"metrics": metrics},
    )
