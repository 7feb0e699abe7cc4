"""The traffic engine behind loadgen.py: what to send, how, and what came back.

Two ways to drive a URL:

- open loop (``Plan.rate``): request i is due at start + i/R whatever the server
  does. A slow server does not slow the schedule down, and latency is measured
  from the time a request was *due*, not from when it was finally sent, so the
  wait it spent behind slow requests is not hidden (no coordinated omission).
  Every request that finds no idle keep-alive connection opens a new one.
- closed loop (``Plan.concurrency``): N workers, each sending its next request
  as soon as the previous one is answered, each on its own keep-alive
  connection.

It is one asyncio event loop with a small HTTP/1.1 client protocol of its own
(docs/traffic.md says why). ``audit.py`` and ``loadgen.py`` build on the
types here; this module imports neither.
"""

from __future__ import annotations

import asyncio
import math
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:8080/hello"
QUANTILES = (0.5, 0.9, 0.99)

# The server's metric names (metrics.py).
REQUESTS = "http_requests_total"
STATUSES = "response_status_total"
LATENCY = "http_response_time_seconds"


class UsageError(Exception):
    """A bad argument or an unusable target: one line on stderr, exit status 2."""


# --- the plan ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    request_target: str  # path and query, as sent on the request line
    path: str  # without the query

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http":
            raise UsageError(f"malformed URL {url!r}: only http:// URLs are supported")
        try:
            port = parts.port or 80
        except ValueError as e:
            raise UsageError(f"malformed URL {url!r}: {e}") from None
        if not parts.hostname:
            raise UsageError(f"malformed URL {url!r}: no host")
        if any(c.isspace() for c in url):
            raise UsageError(f"malformed URL {url!r}: contains white space")
        path = parts.path or "/"
        request_target = path + (f"?{parts.query}" if parts.query else "")
        return cls(url, parts.hostname, port, request_target, path)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def sibling(self, path: str) -> str:
        """The URL of another path on the same server."""
        return f"http://{self.netloc}{path}"


@dataclass(frozen=True)
class Plan:
    target: Target
    rate: float | None = None  # open loop
    concurrency: int | None = None  # closed loop
    duration: float | None = None
    requests: int | None = None
    timeout: float = 10.0
    method: str = "GET"
    # More servers of the same service (replicas): requests go round robin
    # over target and these, so each gets 1/N of them.
    replicas: tuple[Target, ...] = ()

    @property
    def targets(self) -> tuple[Target, ...]:
        return (self.target, *self.replicas)

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    def describe(self) -> str:
        how = f"open loop at {self.rate:g} req/s" if self.open_loop else f"closed loop, {self.concurrency} connections"
        if self.requests is not None:
            until = f"{self.requests} requests"
            if self.duration is not None:
                until += f" or {self.duration:g} s"
        else:
            until = f"{self.duration:g} s"
        where = self.target.url + (f" and {len(self.replicas)} more replicas" if self.replicas else "")
        return f"{self.method} {where}, {how}, {until}, timeout {self.timeout:g} s"


# --- what the client saw ----------------------------------------------------


@dataclass
class Stats:
    """Everything measured during a run; the event loop is its only writer."""

    plan: Plan
    started: float = 0.0  # time.monotonic()
    started_wall: float = 0.0  # time.time()
    first_send: float = 0.0
    last_send: float = 0.0
    finished: float = 0.0
    sent: int = 0  # requests begun (written, or tried to connect for)
    statuses: Counter[int] = field(default_factory=Counter)
    timeouts: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # transport errors by kind
    # Seconds from the time each answered request was due (open loop) or
    # sent (closed loop) to the end of its response.
    latencies: list[float] = field(default_factory=list)
    # Seconds from writing the request to the end of the response: what the
    # server's own histogram measures, plus the network.
    service_times: list[float] = field(default_factory=list)
    # Open loop: how late each request was written, behind its schedule.
    send_lags: list[float] = field(default_factory=list)
    connections_opened: int = 0
    interrupted: bool = False  # stopped early by Ctrl-C

    @property
    def responses(self) -> int:
        return sum(self.statuses.values())

    @property
    def failures(self) -> int:
        """Requests with no response: timeouts and transport errors."""
        return self.timeouts + sum(self.errors.values())

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def send_rate(self) -> float:
        """Requests begun per second over the time they were being sent."""
        if self.sent == 0:
            return 0.0
        rate = self.plan.rate
        # n requests due at 0, 1/R, ..., (n-1)/R span n/R seconds of schedule.
        window = self.last_send - self.first_send + (1 / rate if rate else 0.0)
        return self.sent / window if window > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        elapsed = self.elapsed
        return {
            "plan": self.plan.describe(),
            "url": self.plan.target.url,
            "urls": [t.url for t in self.plan.targets],
            "mode": "open" if self.plan.open_loop else "closed",
            "target_rate": self.plan.rate,
            "concurrency": self.plan.concurrency,
            "started": self.started_wall,
            "elapsed_seconds": elapsed,
            "sent": self.sent,
            "send_rate": self.send_rate(),
            "responses": self.responses,
            "response_rate": self.responses / elapsed if elapsed > 0 else 0.0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "timeouts": self.timeouts,
            "transport_errors": dict(self.errors),
            "connections_opened": self.connections_opened,
            "interrupted": self.interrupted,
            "latency_seconds": distribution(self.latencies),
            "service_time_seconds": distribution(self.service_times),
            "send_lag_seconds": distribution(self.send_lags) if self.send_lags else None,
        }


def quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank); NaN when empty."""
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def distribution(values: Iterable[float]) -> dict[str, float | int]:
    ordered = sorted(values)
    out: dict[str, float | int] = {"count": len(ordered)}
    if ordered:
        out["min"] = ordered[0]
        for q in QUANTILES:
            out[f"p{q * 100:g}"] = quantile(ordered, q)
        out["max"] = ordered[-1]
        out["mean"] = sum(ordered) / len(ordered)
    return out


# --- HTTP/1.1 on asyncio streams --------------------------------------------


class ProtocolError(Exception):
    pass


MAX_HEAD = 64 * 1024


class ConnectionClosed(ConnectionError):
    """The server closed the connection before the response was complete."""

    def __init__(self, partial: bool) -> None:
        super().__init__("connection closed mid-response" if partial else "connection closed")
        self.partial = partial


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time.

    A Protocol rather than asyncio streams: the response is parsed in
    data_received, with no coroutine per read; measured here, about 15% less
    CPU per request than StreamReader (the rest is the kernel's send/recv).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bool]] | None = None
        self.head_only = False
        self.closed = False
        self._head: tuple[int, int, bool, str, int | None] | None = None  # status, body start, keep, framing, length

    @classmethod
    async def open(cls, target: Target) -> Connection:
        loop = asyncio.get_running_loop()
        # asyncio turns TCP_NODELAY on for TCP transports.
        _, protocol = await loop.create_connection(cls, target.host, target.port)
        return protocol

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            try:
                self._parse()
            except ProtocolError as e:
                self.waiter.set_exception(e)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self._head is not None and self._head[3] == "eof":
            # A body without a length ends with the connection.
            waiter.set_result((self._head[0], False))
        else:
            waiter.set_exception(exc if exc is not None else ConnectionClosed(bool(self.buffer)))

    # --- the exchange -------------------------------------------------------

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """Send a request and read the whole response: (status, reusable)."""
        if self.closed or self.transport is None:
            raise ConnectionClosed(False)
        self.waiter = asyncio.get_running_loop().create_future()
        self.head_only = request.startswith(b"HEAD ")
        self._head = None
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def _parse(self) -> None:
        buf = self.buffer
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("response headers too long")
                return
            self._head = self._parse_head(bytes(buf[:end]).decode("latin-1"), end + 4)
        status, start, keep, framing, length = self._head
        if framing == "eof":
            return  # connection_lost completes it
        if framing == "chunked":
            length = self._chunked_length(start)
            if length is None:
                return
        assert length is not None
        if len(buf) < start + length:
            return
        del buf[: start + length]
        assert self.waiter is not None
        self.waiter.set_result((status, keep))

    def _parse_head(self, head: str, start: int) -> tuple[int, int, bool, str, int | None]:
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/") or not code.isdigit():
            raise ProtocolError(f"bad status line {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        status = int(code)
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if self.head_only or status in (204, 304) or 100 <= status < 200:
            return status, start, keep, "length", 0
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return status, start, keep, "chunked", None
        if "content-length" in headers:
            try:
                return status, start, keep, "length", int(headers["content-length"])
            except ValueError:
                raise ProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
        return status, start, False, "eof", None

    def _chunked_length(self, start: int) -> int | None:
        """The length of a complete chunked body at start, or None if more is to come."""
        buf, pos = self.buffer, start
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            except ValueError:
                raise ProtocolError("bad chunk size") from None
            pos = eol + 2
            if size == 0:
                # Trailers, if any, end with an empty line.
                end = buf.find(b"\r\n\r\n", pos - 2)
                return None if end < 0 else end + 4 - start
            pos += size + 2
            if pos > len(buf):
                return None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        return str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


# --- the run ----------------------------------------------------------------


class Generator:
    def __init__(self, plan: Plan, progress: Progress | None = None, interruptible: bool = False) -> None:
        self.plan = plan
        self.interruptible = interruptible
        self.stats = Stats(plan)
        self.progress = progress
        self.requests = {
            t: (
                f"{plan.method} {t.request_target} HTTP/1.1\r\nHost: {t.netloc}\r\n"
                "User-Agent: loadgen\r\nAccept: */*\r\n\r\n"
            ).encode("latin-1")
            for t in plan.targets
        }
        # Idle keep-alive connections, per target.
        self.idle: dict[Target, list[Connection]] = {t: [] for t in plan.targets}
        self.busy: set[Connection] = set()

    async def run(self) -> Stats:
        s = self.stats
        s.started, s.started_wall = time.monotonic(), time.time()
        reporter = asyncio.create_task(self._report()) if self.progress else None
        if self.interruptible:
            # The first Ctrl-C ends the schedule and lets the requests in
            # flight finish, so the summary and the audit still add up; the
            # second one aborts.
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._interrupt)
        try:
            if self.plan.open_loop:
                await self._open_loop()
            else:
                await self._closed_loop()
        finally:
            if self.interruptible:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
            s.finished = time.monotonic()
            if reporter:
                reporter.cancel()
            for conn in [*(c for pool in self.idle.values() for c in pool), *self.busy]:
                conn.close()
            if self.progress:
                self.progress.done(s)
        return s

    def _interrupt(self) -> None:
        s = self.stats
        s.interrupted = True
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        if self.progress and self.progress.tty:
            self.progress.stream.write("\n")
        print(
            f"loadgen: stopping; waiting for {s.sent - s.responses - s.failures} requests in flight "
            "(Ctrl-C again aborts)",
            file=sys.stderr,
            flush=True,
        )

    def _more(self, elapsed: float, sent: int) -> bool:
        plan, s = self.plan, self.stats
        if s.interrupted:
            return False
        if plan.requests is not None and sent >= plan.requests:
            return False
        return plan.duration is None or elapsed < plan.duration

    async def _open_loop(self) -> None:
        plan, s = self.plan, self.stats
        assert plan.rate is not None
        tasks: set[asyncio.Task[None]] = set()
        targets = plan.targets
        i = 0
        # i / rate, not started + i * interval - started: the division is
        # exact where the schedule ends on the duration (50 at 50/s in 1 s),
        # where the subtraction could round below it and send one more.
        while self._more(i / plan.rate, i):
            due = s.started + i / plan.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # Late or not, every request keeps its place in the schedule: a
            # slow server does not make the client ask less.
            task = asyncio.create_task(self._one(targets[i % len(targets)], due, None))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks)

    async def _closed_loop(self) -> None:
        assert self.plan.concurrency is not None

        async def worker(target: Target) -> None:
            conn: Connection | None = None
            try:
                while self._more(time.monotonic() - self.stats.started, self.stats.sent):
                    conn = await self._one(target, None, conn)
            finally:
                # Else the server keeps it (and a thread) until its idle timeout.
                if conn is not None:
                    conn.close()

        targets = self.plan.targets
        await asyncio.gather(*(worker(targets[k % len(targets)]) for k in range(self.plan.concurrency)))

    async def _one(self, target: Target, due: float | None, conn: Connection | None) -> Connection | None:
        """One request to target; due is its scheduled time (open loop).

        Closed loop passes its connection in and gets it back (None if closed).
        """
        s = self.stats
        pooled = due is not None
        start = time.monotonic()
        s.sent += 1
        if s.sent == 1:
            s.first_send = start
        s.last_send = start
        if due is not None:
            s.send_lags.append(max(0.0, start - due))
        else:
            due = start
        try:
            async with asyncio.timeout(self.plan.timeout):
                if pooled:
                    idle = self.idle[target]
                    conn = idle.pop() if idle else None
                if conn is None:
                    conn = await Connection.open(target)
                    s.connections_opened += 1
                self.busy.add(conn)
                written = time.monotonic()
                status, keep = await conn.exchange(self.requests[target])
        except TimeoutError:
            s.timeouts += 1
            keep = False
        except (OSError, ValueError, ProtocolError) as e:
            s.errors[_error_kind(e)] += 1
            keep = False
        else:
            end = time.monotonic()
            s.statuses[status] += 1
            s.latencies.append(end - due)
            s.service_times.append(end - written)
        if conn is None:
            return None
        self.busy.discard(conn)
        if not keep:
            # A timed-out or broken connection may still carry a late
            # response: it cannot be reused.
            conn.close()
            return None
        if pooled:
            self.idle[target].append(conn)
        return conn

    async def _report(self) -> None:
        assert self.progress is not None
        while True:
            await asyncio.sleep(self.progress.interval)
            self.progress.show(self.stats)


class Progress:
    """The live line on stderr: redrawn in place on a terminal, else a plain line every few seconds."""

    def __init__(self, stream: TextIO, interval: float | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 5.0)

    def line(self, s: Stats) -> str:
        recent = sorted(s.latencies[-20000:])
        elapsed = s.elapsed
        rate = s.sent / elapsed if elapsed > 0 else 0.0
        errors = s.failures + sum(n for code, n in s.statuses.items() if code >= 500)
        return (
            f"{elapsed:6.1f}s  sent {s.sent}  {rate:7.1f} req/s  answered {s.responses}  "
            f"in flight {s.sent - s.responses - s.failures}  5xx+failed {errors}  "
            f"p50 {_ms(quantile(recent, 0.5))}  p99 {_ms(quantile(recent, 0.99))}"
        )

    def show(self, s: Stats) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line(s))
        else:
            self.stream.write(self.line(s) + "\n")
        self.stream.flush()

    def done(self, s: Stats) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.1f} ms"


def run(plan: Plan, progress: Progress | None = None, interruptible: bool = False) -> Stats:
    """Drive the target according to plan; blocks until done.

    interruptible (main thread only): Ctrl-C stops the schedule early and
    waits for the requests in flight.
    """
    return asyncio.run(Generator(plan, progress, interruptible).run())


def check_reachable(target: Target, timeout: float = 5.0) -> None:
    """Fail fast with a UsageError if nothing listens at the target."""
    try:
        socket.create_connection((target.host, target.port), timeout=timeout).close()
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve {target.host!r}: {e.strerror}") from None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UsageError(f"cannot connect to {target.netloc}: {reason}; is the server running?") from None


# --- the summary table ------------------------------------------------------


def format_summary(summary: Mapping[str, Any], header: bool = True) -> str:
    """The summary table; header=False leaves out the first line, the plan."""
    out = [f"loadgen: {summary['plan']}"] if header else []
    if summary.get("interrupted"):
        out.append("loadgen: stopped early by Ctrl-C")
    out.append("")
    rows = [
        ("elapsed", f"{summary['elapsed_seconds']:.2f} s"),
        ("sent", f"{summary['sent']}"),
    ]
    rate = f"{summary['send_rate']:.1f} req/s"
    if summary["target_rate"]:
        rate += f" (target {summary['target_rate']:g}, {summary['send_rate'] / summary['target_rate'] - 1:+.2%})"
    rows.append(("achieved rate", rate))
    lag = summary["send_lag_seconds"]
    if lag and lag["count"]:
        rows.append(("behind schedule", f"p99 {_ms(lag['p99'])}, max {_ms(lag['max'])}"))
    rows.append(("answered", f"{summary['responses']} ({summary['response_rate']:.1f}/s over the run)"))
    for code, n in summary["statuses"].items():
        rows.append((f"  status {code}", f"{n} ({n / max(1, summary['sent']):.1%})"))
    rows.append(("timeouts", str(summary["timeouts"])))
    errors = summary["transport_errors"]
    rows.append(("transport errors", str(sum(errors.values()))))
    for kind, n in sorted(errors.items()):
        rows.append((f"  {kind}", str(n)))
    rows.append(("connections", f"{summary['connections_opened']} opened"))
    width = max(len(k) for k, _ in rows)
    out += [f"  {k:<{width}}  {v}" for k, v in rows]
    out += ["", f"  {'latency':<16}" + "".join(f"{h:>10}" for h in ("min", "p50", "p90", "p99", "max"))]
    for name, key in (("from due time", "latency_seconds"), ("send to answer", "service_time_seconds")):
        d = summary[key]
        cells = [_ms(d.get(k)) for k in ("min", "p50", "p90", "p99", "max")]
        out.append(f"  {name:<16}" + "".join(f"{c:>10}" for c in cells))
    return "\n".join(out)
