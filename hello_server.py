"""The tutorial's hello server, in the standard library, instrumented for Prometheus.

GET /hello sleeps a random delay in [0, max_delay) and then fails with HTTP 500
"Error" with probability failure_rate, else answers 200 "Hello!". GET /metrics
serves the Prometheus exposition from the same port. Run ``python
hello_server.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import random
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, MetricsHandler
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from connections import GuardedHandler, GuardedServer
from metrics import HTTPMetrics, instrument

T = TypeVar("T")

HELLO = "/hello"
METRICS = "/metrics"
ROUTES = (HELLO, METRICS)
ALLOWED = "GET, HEAD"


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    max_delay: float = 1.0
    failure_rate: float = 0.2
    seed: int | None = None
    access_log: bool = True
    grace_period: float = 10.0
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    write_timeout: float = 30.0
    max_connections: int = 4096


class HelloServer(GuardedServer):
    """A threading server that carries the configuration its handlers read.

    GuardedServer (connections.py) bounds what clients can hold: deadlines for
    a request's head and for idle keep-alive, a cap on connections with a
    thread (503 past it), and a drain on shutdown.
    """

    # socketserver's default backlog of 5 drops SYNs under a burst of
    # connections, and clients then retry only after 1 s, 2 s, 4 s. Even 1024
    # overflowed (725 drops, `nstat TcpExtListenOverflows`) when wrk opened
    # 2,000 connections at once while the accept thread waited for the GIL;
    # the kernel caps this at net.core.somaxconn (4096 on Debian 12).
    request_queue_size = 4096

    def __init__(self, config: Config, handler: type[HelloHandler], registry: CollectorRegistry) -> None:
        self.config = config
        self.registry = registry
        self.rng = random.Random(config.seed)
        # (second, the Server and Date header lines) that start every response;
        # see HelloHandler.send_response.
        self.fixed_headers = (0, b"")
        super().__init__(
            (config.host, config.port),
            handler,
            registry,
            header_timeout=config.header_timeout,
            idle_timeout=config.idle_timeout,
            write_timeout=config.write_timeout,
            max_connections=config.max_connections,
            scrape_paths=(METRICS,),
        )

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up is routine, not a server error.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class HelloHandler(GuardedHandler, MetricsHandler):
    """The application: routes, the random delay and failure, the access log.

    It knows nothing of the request metrics; ``metrics.instrument`` adds them.
    It subclasses ``MetricsHandler`` to serve /metrics with the library's own
    content negotiation (OpenMetrics, gzip, ``name[]``).
    """

    server: HelloServer
    # HTTP/1.0 (the stdlib default) closes every connection: about 4x slower.
    protocol_version = "HTTP/1.1"
    # Buffer each response; handle_one_request flushes it in one write, so
    # headers and body never wait on Nagle's algorithm for the client's ACK.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    @property
    def registry(self) -> CollectorRegistry:  # type: ignore[override]
        return self.server.registry

    # --- request life cycle -------------------------------------------------

    def handle_one_request(self) -> None:
        self._received = time.perf_counter()
        self._headers_ended = False
        self._hold_headers = False
        # The stdlib answers an over-long request line (414) before it parses
        # anything: the access log must not show the previous request's path.
        self.path = None  # type: ignore[assignment]
        try:
            super().handle_one_request()
            self.wfile.flush()
        except (ConnectionError, TimeoutError):
            # The client went away; there is no one left to answer.
            self.close_connection = True
        except Exception:
            self.close_connection = True
            traceback.print_exc(file=sys.stderr)
            if not self._headers_ended:
                # Drop a status line the handler may have buffered before it
                # raised; the client has received nothing yet.
                self._headers_buffer = []
                try:
                    self._respond(500, b"Internal Server Error\n")
                    self.wfile.flush()
                except (ConnectionError, TimeoutError):
                    pass

    def parse_request(self) -> bool:
        # The access log's clock; the metrics keep their own.
        self._received = time.perf_counter()
        return super().parse_request()

    def end_headers(self) -> None:
        if self._hold_headers:
            return
        self._headers_ended = True
        super().end_headers()

    def do_GET(self) -> None:
        route = self.path.partition("?")[0]
        if route == HELLO:
            self._hello()
        elif route == METRICS:
            self._metrics()
        else:
            self._respond(404, b"Not Found\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _other_method(self) -> None:
        # We read no request body, so the connection cannot be reused.
        self.close_connection = True
        if self.path.partition("?")[0] in ROUTES:
            self._respond(405, b"Method Not Allowed\n", [("Allow", ALLOWED)])
        else:
            self._respond(404, b"Not Found\n")

    do_POST = do_PUT = do_PATCH = do_DELETE = _other_method

    # --- routes -------------------------------------------------------------

    def _hello(self) -> None:
        config, rng = self.server.config, self.server.rng
        if config.max_delay > 0:
            time.sleep(rng.uniform(0, config.max_delay))
        if rng.random() < config.failure_rate:
            self._respond(500, b"Error\n")
        else:
            self._respond(200, b"Hello!\n")

    def _metrics(self) -> None:
        # MetricsHandler.do_GET writes the exposition without Content-Length,
        # which leaves a keep-alive client waiting for a close that never
        # comes. Capture its body, then add the header.
        sink = io.BytesIO()
        wfile, self.wfile = self.wfile, sink
        self._hold_headers = True
        try:
            MetricsHandler.do_GET(self)
        finally:
            self.wfile, self._hold_headers = wfile, False
        body = sink.getvalue()
        self._end_response(body)

    def _respond(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        for name, value in headers:
            self.send_header(name, value)
        self._end_response(body)

    def _end_response(self, body: bytes) -> None:
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection or self.server.stopping:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_response(self, code: int, message: str | None = None) -> None:
        # The stdlib's send_response, with its Server and Date lines made once
        # a second rather than per response. It formats the date through
        # email.utils (23,700 CPU instructions, 11% of a /hello request, by
        # callgrind) and sends each line through send_header; one cached
        # piece instead of the two calls saves another 8,100 (instrumented)
        # to 8,700 (uninstrumented), 4-5% of a request.
        self.log_request(code)
        self.send_response_only(code, message)
        if self.request_version != "HTTP/0.9":  # HTTP/0.9 responses have no headers
            now = int(time.time())
            second, lines = self.server.fixed_headers
            if second != now:
                lines = f"Server: {self.version_string()}\r\nDate: {self.date_time_string(now)}\r\n".encode("latin-1")
                # Threads racing here store equal values; the tuple is swapped whole.
                self.server.fixed_headers = (now, lines)
            self._headers_buffer.append(lines)

    # --- logging ------------------------------------------------------------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self.server.config.access_log:
            return
        # logfmt: one line per response, parseable by Loki, Vector, grep.
        path = getattr(self, "path", None)
        sys.stderr.write(
            f"ts={time.strftime('%Y-%m-%dT%H:%M:%S%z')} client={self.client_address[0]} "
            f"method={self.command or '-'} path={json.dumps(path) if path else '-'} "
            f"status={int(code) if str(code).isdigit() else code} "
            f"duration={time.perf_counter() - self._received:.6f} "
            # Set by metrics.instrument: a validated or generated id, never the header as sent.
            f"trace_id={getattr(self, 'trace_id', None) or '-'}\n"
        )

    def log_error(self, format: str, *args: object) -> None:
        # The stdlib's own error lines ("code 400, message ...") repeat what
        # the access log already says.
        pass


def make_server(config: Config, registry: CollectorRegistry | None = None, instrumented: bool = True) -> HelloServer:
    """Bind a server for config; its /metrics serves registry (a new one if None)."""
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    handler: type[HelloHandler] = HelloHandler
    if instrumented:
        handler = instrument(HelloHandler, HTTPMetrics(registry, routes=ROUTES))  # type: ignore[assignment]
    return HelloServer(config, handler, registry)


def serve(server: HelloServer, stop: threading.Event) -> bool:
    """Serve until stop is set, then shut down gracefully.

    Stops accepting, closes the connections that are waiting for a request,
    and lets requests being read or handled finish within the grace period
    (their responses say Connection: close). Returns False if connections
    were still busy when the grace period ran out.
    """
    thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    # Python runs signal handlers in the main thread only, but the kernel may
    # deliver SIGTERM to any thread that does not block it: to one just
    # created for a connection, the main thread then never woke from
    # stop.wait(), and the process hung (2 of 10 SIGTERMs during a burst of
    # connections). Threads inherit the mask of the thread that starts them,
    # so blocking the signals while the accept thread starts keeps every
    # connection's thread out of the way.
    blocked = {signal.SIGTERM, signal.SIGINT}
    if threading.current_thread() is threading.main_thread():
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    else:
        thread.start()
    stop.wait()
    server.stopping = True
    server.shutdown()
    thread.join()
    server.server_close()
    return server.wait_drained(server.config.grace_period)


def _within(convert: Callable[[str], T], low: T, high: T, name: str, high_inclusive: bool = True) -> Callable[[str], T]:
    """An argparse type: convert, then refuse values outside [low, high] (or [low, high))."""

    def parse(text: str) -> T:
        value = convert(text)
        # Written so that NaN fails every comparison and is refused.
        if not (low <= value <= high if high_inclusive else low <= value < high):  # type: ignore[operator]
            raise ValueError(text)
        return value

    # argparse names the type in its error: "invalid probability in [0, 1] value: '2'".
    parse.__name__ = name
    return parse


_probability = _within(float, 0.0, 1.0, "probability in [0, 1]")
_seconds = _within(float, 0.0, float("inf"), "number of seconds >= 0", high_inclusive=False)
_port = _within(int, 0, 65535, "port in 0..65535")
# A deadline of 0 would close every connection; past a day is a typo.
_timeout = _within(float, 0.001, 86400.0, "number of seconds in [0.001, 86400]")
_count = _within(int, 1, 1_000_000, "count in 1..1000000")


def _switch(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_switch.__name__ = "on/off"


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config from flags, each defaulting to a HELLO_* environment variable.

    A bad value, from a flag or the environment, exits with status 2 and says which.
    """
    env = os.environ if environ is None else environ
    d = Config()
    parser = argparse.ArgumentParser(
        description="The tutorial's hello server, instrumented for Prometheus.",
        epilog="Every flag defaults to the HELLO_* environment variable named in its help.",
    )

    def option(flag: str, kind: Callable[[str], object], default: object, text: str) -> None:
        var = "HELLO_" + flag[2:].upper().replace("-", "_")
        # argparse runs string defaults through `type`, so a bad environment
        # value is reported like a bad flag.
        # An empty variable means "unset", as in shells and compose files.
        value = env.get(var) or ("" if default is None else str(default))
        if env.get(var):
            try:
                kind(value)
            except ValueError:
                parser.error(f"environment variable {var}: invalid {kind.__name__} value: {value!r}")
        parser.add_argument(flag, type=kind, default=value or None, help=f"{text} ({var}, default: %(default)s)")

    option("--host", str, d.host, "address to bind")
    option("--port", _port, d.port, "port; 0 picks a free one")
    option("--max-delay", _seconds, d.max_delay, "/hello sleeps uniformly in [0, this) seconds")
    option("--failure-rate", _probability, d.failure_rate, "share of /hello answered 500")
    option("--seed", int, d.seed, "seed for reproducible delays and failures")
    option("--access-log", _switch, "on" if d.access_log else "off", "one logfmt line per response on stderr")
    option("--grace-period", _seconds, d.grace_period, "seconds requests in flight get to finish on SIGTERM")
    option(
        "--header-timeout",
        _timeout,
        d.header_timeout,
        "seconds a client has to send a request's line and headers, from its first byte",
    )
    option(
        "--idle-timeout",
        _timeout,
        d.idle_timeout,
        "seconds a keep-alive connection may wait for its next request; set above a load balancer's idle timeout",
    )
    option(
        "--write-timeout",
        _timeout,
        d.write_timeout,
        "seconds a response may wait for a client that reads nothing before the connection is closed",
    )
    option(
        "--max-connections",
        _count,
        d.max_connections,
        "connections served at once (a thread each); past it requests get 503",
    )
    return Config(**vars(parser.parse_args(argv)))


def _bind_problem(error: OSError, config: Config) -> tuple[int, str]:
    """(exit status, message) for a failed bind: a bad --host is a bad argument (2), a busy port is not (1)."""
    where = f"{config.host}:{config.port}"
    if isinstance(error, socket.gaierror):
        return 2, f"cannot resolve --host {config.host!r} ({error.strerror}); use an IPv4 address or name, e.g. 0.0.0.0"
    if error.errno == errno.EADDRNOTAVAIL:
        return 2, f"cannot bind --host {config.host}: not an address of this machine; try 0.0.0.0 or 127.0.0.1"
    if error.errno == errno.EADDRINUSE:
        return 1, f"cannot listen on {where}: port in use; pick another --port (HELLO_PORT) or stop what uses it"
    if error.errno == errno.EACCES:
        return 1, f"cannot listen on {where}: ports below 1024 need privileges; pick another --port (HELLO_PORT)"
    return 1, f"cannot listen on {where}: {error.strerror or error}"


def main(argv: Sequence[str] | None = None, instrumented: bool = True) -> int:
    """Serve until SIGTERM or SIGINT; instrumented=False is bench.py's baseline."""
    config = parse_args(argv)
    # Each connection is a descriptor, and a shell's default soft limit (1,024)
    # sits far below --max-connections: accept() would fail with EMFILE, and
    # socketserver retries it in a busy loop. The hard limit is the
    # administrator's ceiling; Go raises the soft limit to it at start too.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit is not a number setrlimit takes
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        server = make_server(config, instrumented=instrumented)
    except OSError as e:
        code, message = _bind_problem(e, config)
        print(f"hello_server: {message}", file=sys.stderr)
        return code
    # Threads waiting for the GIL wake every switch interval (5 ms by default)
    # to demand it; with 2,000 connections on one core those wake-ups (futex
    # and context switches in `perf`) ate the core. The tutorial's workload,
    # wrk, 15 s: 485 req/s of an ideal 4,000 with 2,024 timeouts at 5 ms,
    # 2,585 at 20 ms, 3,214 and no errors at 100 ms. Handlers give the GIL up
    # at every socket call and sleep, so none holds it anywhere near that long.
    sys.setswitchinterval(0.1)
    stop = threading.Event()
    # Python as PID 1 in a container ignores SIGTERM unless it asks for it;
    # docker stop sends SIGTERM, then SIGKILL after 10 s.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    host, port = server.server_address[:2]
    print(f"hello_server: listening on http://{host}:{port} (try /hello and /metrics)", file=sys.stderr, flush=True)
    drained = serve(server, stop)
    print(
        "hello_server: stopped" if drained else "hello_server: stopped; grace period ran out with requests in flight",
        file=sys.stderr,
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
