"""Connections that cannot outstay their welcome: deadlines, an admission cap, a drain, and their metrics.

``http.server``'s ``ThreadingHTTPServer`` starts a thread for every connection
and then waits for the client as long as it likes: 10,000 connections that
send nothing held 10,000 threads and 324 MB here, and a client sending one
header byte a second kept its thread for good. ``GuardedServer`` (a
``ThreadingHTTPServer``) and ``GuardedHandler`` (a ``BaseHTTPRequestHandler``
mixin) bound each of those:

- header deadline: a request's line and headers must have arrived
  ``header_timeout`` seconds after its first byte (after the accept, for a
  connection's first request). The deadline is absolute: each read waits only
  for the time left, so a client trickling a byte a second cannot extend it.
- idle timeout: a keep-alive connection waits at most ``idle_timeout`` seconds
  for the next request's first byte.
- write timeout: a response's send that makes no progress for
  ``write_timeout`` seconds (the client reads nothing) ends the connection.
- a lobby: a new connection waits for its first byte in one thread's
  selector, as in cheroot and gunicorn's gthread worker, so connections that
  never speak cost a socket, not a thread (about 30 KB each).
- admission cap: at most ``max_connections`` connections hold a thread. Past
  it, the lobby reads a connection's request line and answers ``503`` with
  ``Retry-After`` and ``Connection: close``: fast, and no thread for it. A
  scrape (``/metrics``) is still served, by a few threads beyond the cap.
- drain: on shutdown, connections waiting for a request (in the lobby or
  kept alive) are closed at once; requests being read or handled finish, and
  say ``Connection: close``.

A connection that misses a deadline is closed without an answer, as Go's
net/http does: it is an attacker or a client that has gone, and a 408 sent to
an idle keep-alive connection races with the client's next request, which
would then read the 408 as its answer.

``ConnectionMetrics`` counts all of it as one collector, exactly, under one
lock; every count changes once per connection, never per request, so the
per-request cost is the deadline bookkeeping alone.
"""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import io
import itertools
import math
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

# Why a connection was closed: the `reason` label, a fixed set.
NORMAL = "normal"  # the client hung up, or a response said Connection: close
HEADER_TIMEOUT = "header_timeout"  # no complete request line and headers in time
IDLE_TIMEOUT = "idle_timeout"  # keep-alive, no next request in time
REFUSED = "refused"  # past the cap: answered 503, then closed
SHUTDOWN = "shutdown"  # waiting for a request when the server stopped
WRITE_TIMEOUT = "write_timeout"  # the client read nothing of a response for write_timeout
REASONS = (NORMAL, HEADER_TIMEOUT, IDLE_TIMEOUT, WRITE_TIMEOUT, REFUSED, SHUTDOWN)

#: Seconds a refused client is told to wait (Retry-After).
RETRY_AFTER = 1
REFUSAL = b"Service Unavailable: too many connections, retry later\n"
#: Threads past the cap for scrapes (GuardedServer.scrape_paths): when the
#: server sheds load, Prometheus must still see it. A bound, so that a flood of
#: scrape requests cannot take the server past its memory budget.
SCRAPE_THREADS = 8
#: The longest request line a refused connection may send before it is answered anyway.
MAX_REFUSED_LINE = 8192
#: After its 503, a refused connection's further bytes are read and dropped for
#: up to this long before the close. Closing with unread bytes makes the kernel
#: send a reset, which can destroy the 503 before the client has read it.
LINGER = 2.0

_TIMEVAL = struct.Struct("@ll")


class ConnectionMetrics:
    """Connection counts, as one collector; every count is read and written under one lock."""

    def __init__(self, registry: CollectorRegistry, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Condition()
        self._accepted = 0
        self._closed = dict.fromkeys(REASONS, 0)
        self._refused = 0
        # Connections holding a thread: what the cap limits and a drain waits for.
        self._served = 0
        registry.register(self)

    def accepted(self) -> None:
        with self._lock:
            self._accepted += 1

    def take_thread(self, beyond: int = 0) -> bool:
        """True if a connection may have a thread (and counts it); False past the cap (plus beyond)."""
        with self._lock:
            if self._served >= self.limit + beyond:
                return False
            self._served += 1
            return True

    def release(self, reason: str) -> None:
        """A connection that held a thread is closed."""
        with self._lock:
            self._served -= 1
            self._closed[reason] += 1
            if not self._served:
                self._lock.notify_all()

    def closed(self, reason: str) -> None:
        """A connection that never had a thread is closed."""
        with self._lock:
            self._closed[reason] += 1

    def refused(self) -> None:
        with self._lock:
            self._refused += 1

    def wait_served(self, timeout: float) -> bool:
        """Wait until no connection holds a thread; False if timeout ran out first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._served, timeout)

    # --- prometheus_client's collector protocol -------------------------------

    def describe(self) -> list[Metric]:
        return self._families(0, dict.fromkeys(REASONS, 0), 0)

    def collect(self) -> list[Metric]:
        with self._lock:
            accepted, closed, refused = self._accepted, dict(self._closed), self._refused
        return self._families(accepted, closed, refused)

    def _families(self, accepted: int, closed: dict[str, int], refused: int) -> list[Metric]:
        closed_family = CounterMetricFamily(
            "http_connections_closed",
            "TCP connections closed, by reason: " + ", ".join(REASONS) + ".",
            labels=["reason"],
        )
        for reason, n in closed.items():
            closed_family.add_metric([reason], float(n))
        return [
            CounterMetricFamily("http_connections_accepted", "TCP connections accepted.", value=float(accepted)),
            closed_family,
            GaugeMetricFamily(
                "http_connections_open",
                "TCP connections open now, including those being refused.",
                value=float(accepted - sum(closed.values())),
            ),
            GaugeMetricFamily(
                "http_connections_limit",
                "Connections that may hold a thread at once; past it requests are refused with 503.",
                value=float(self.limit),
            ),
            CounterMetricFamily(
                "http_requests_refused",
                "Requests answered 503 because the server was at its connection limit.",
                value=float(refused),
            ),
        ]


class _DeadlineReader(io.RawIOBase):
    """A socket's input where every read waits only until the connection's current deadline.

    The standard library's socket timeout restarts with every recv, so a
    client sending a byte a second would never reach it. Here each recv gets
    the time left (SO_RCVTIMEO, which keeps the socket blocking: a timeout set
    with settimeout() would also apply to the response's writes, and add a
    poll() to every recv).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline = math.inf
        self.reason = HEADER_TIMEOUT
        # The reason the connection ended early, once it has.
        self.expired: str | None = None

    def arm(self, seconds: float, reason: str) -> None:
        self.deadline = time.monotonic() + seconds
        self.reason = reason

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = self.reason
            raise TimeoutError(self.reason)
        whole = int(left)
        # At least 1 µs: a zero timeval would mean "wait forever".
        self._sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, int((left - whole) * 1e6) or 1)
        )
        try:
            return self._sock.recv_into(buffer)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            self.expired = self.reason
            raise TimeoutError(self.reason) from None


class _TimedWriter(io.RawIOBase):
    """A socket's output where a send that makes no progress for the write timeout fails.

    SO_SNDTIMEO, set once per connection: the kernel returns from a blocked
    send after that long, so a client that stops reading its responses (and
    pipelines requests until the buffers fill) cannot hold a thread forever.
    """

    def __init__(self, sock: socket.socket, timeout: float, reader: _DeadlineReader) -> None:
        self._sock = sock
        self._reader = reader  # where the connection's end reason is kept
        whole = int(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(whole, int((timeout - whole) * 1e6) or 1))

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:  # SO_SNDTIMEO ran out with nothing sent
            self._reader.expired = WRITE_TIMEOUT
            raise TimeoutError(WRITE_TIMEOUT) from None


class GuardedHandler(BaseHTTPRequestHandler):
    """A handler mixin: the connection's reads obey its header and idle deadlines.

    It replaces ``handle()``, the keep-alive loop, with one that waits for
    each request's first byte under a deadline (``rfile.peek``, which reads
    nothing twice), then gives the request's head a deadline of its own, as
    Go's net/http server does.
    """

    server: GuardedServer

    def setup(self) -> None:
        super().setup()
        # The buffered socket files the standard library made; ours replace them.
        self.rfile.close()
        self.wfile.close()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)
        writer = _TimedWriter(self.connection, self.server.write_timeout, self._reader)
        self.wfile = io.BufferedWriter(writer, self.wbufsize or io.DEFAULT_BUFFER_SIZE)
        # True while waiting for a request's first byte: a drain may close it then.
        self.waiting = False
        self.server.handler_started(self)

    def handle(self) -> None:
        server, reader = self.server, self._reader
        # The first request is due header_timeout after the accept, counting
        # the time its first byte took to come.
        reader.deadline = server.accepted_at.pop(self.request, time.monotonic()) + server.header_timeout
        first = True
        self.close_connection = False
        while True:
            self.waiting = True
            # A first request has already sent its first byte (the lobby
            # waited for it): it is answered, with Connection: close.
            if server.stopping and not first:
                reader.expired = SHUTDOWN
                break
            try:
                arrived = self.rfile.peek(1)
            except (TimeoutError, ConnectionError):
                break
            finally:
                self.waiting = False
            if not arrived:  # the client closed, or a drain did
                break
            if not first:
                reader.arm(server.header_timeout, HEADER_TIMEOUT)
            self.handle_one_request()
            # HTTP/0.9 has no keep-alive, but the standard library lets a
            # "Connection: keep-alive" header after a 0.9 request line
            # reopen it, and then answers the next request with a status
            # line in the middle of the 0.9 body.
            if self.close_connection or self.request_version == "HTTP/0.9":
                break
            first = False
            reader.arm(server.idle_timeout, IDLE_TIMEOUT)

    @property
    def close_reason(self) -> str:
        return self._reader.expired or NORMAL

    def close_if_waiting(self) -> None:
        """Close the connection if it is waiting for a request (a drain); else let its request finish."""
        if self.waiting:
            self._reader.expired = SHUTDOWN
            # Wakes the blocked read, which returns end of file.
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)


class GuardedServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with a connection cap, a drain, and connection metrics.

    A new connection waits in a lobby (one thread, a selector) until its
    first byte arrives, so connections that never speak cost no thread. Then
    it gets a thread if fewer than max_connections have one, else a 503.

    Requests for ``scrape_paths`` are served past the cap too, up to
    SCRAPE_THREADS of them at once: shedding must not blind the monitoring.

    Its handler class must include ``GuardedHandler``. If the handler class
    has a ``metrics`` attribute (``metrics.instrument`` sets one), refused
    requests are recorded there as 503 responses too.
    """

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[GuardedHandler],
        registry: CollectorRegistry,
        *,
        header_timeout: float,
        idle_timeout: float,
        write_timeout: float,
        max_connections: int,
        scrape_paths: Iterable[str] = ("/metrics",),
    ) -> None:
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.scrape_paths = frozenset(scrape_paths)
        self.connections = ConnectionMetrics(registry, max_connections)
        # Set when shutdown begins; responses then say Connection: close.
        self.stopping = False
        self._handlers: dict[object, GuardedHandler] = {}
        self._handlers_lock = threading.Lock()
        # When each connection waiting for a thread was accepted: its first
        # request's header deadline counts from then.
        self.accepted_at: dict[object, float] = {}
        self._lobby: _Lobby | None = None
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.accepted()
        if self._lobby is None:  # only the accept thread gets here
            self._lobby = _Lobby(self)
        self._lobby.enter(request, client_address)

    def give_thread(self, request: Any, client_address: Any, accepted_at: float, beyond: int = 0) -> bool:
        """Serve a connection whose first bytes have arrived in a thread; False past the cap (plus beyond)."""
        if not self.connections.take_thread(beyond):
            return False
        request.setblocking(True)
        self.accepted_at[request] = accepted_at
        try:
            super().process_request(request, client_address)
        except Exception:
            # No thread started (out of memory or threads).
            self.accepted_at.pop(request, None)
            self.handle_error(request, client_address)
            self.shutdown_request(request)
            self.connections.release(NORMAL)
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            # The stdlib's: finish_request, handle_error, shutdown_request.
            super().process_request_thread(request, client_address)
        finally:
            # Also when the handler failed before handle() took its entry.
            self.accepted_at.pop(request, None)
            with self._handlers_lock:
                handler = self._handlers.pop(request, None)
            self.connections.release(handler.close_reason if handler else NORMAL)

    def shutdown_request(self, request: Any) -> None:
        # Read what the client has already sent before closing: a close with
        # unread bytes makes the kernel send a reset, which can destroy the
        # response the client has not read yet (a 431 sent before the end of
        # an over-long header, a request pipelined after Connection: close).
        # Only what has arrived, and only so much: no thread waits on it.
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            for _ in range(16):
                if not request.recv(65536, socket.MSG_DONTWAIT):
                    break
        self.close_request(request)

    def handler_started(self, handler: GuardedHandler) -> None:
        # Kept until process_request_thread has read its close reason.
        with self._handlers_lock:
            self._handlers[handler.request] = handler

    def server_close(self) -> None:
        """Stop listening, close every connection waiting for a request, and stop refusing."""
        self.stopping = True
        super().server_close()
        if self._lobby is not None:
            self._lobby.stop()
        with self._handlers_lock:
            handlers = list(self._handlers.values())
        for handler in handlers:
            handler.close_if_waiting()

    def wait_drained(self, timeout: float) -> bool:
        """After server_close: wait until every connection's request has finished; False if timeout ran out."""
        return self.connections.wait_served(timeout)


class _Parked:
    __slots__ = ("accepted_at", "address", "answered", "deadline", "head", "sock")

    def __init__(self, sock: socket.socket, address: Any, accepted_at: float, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.accepted_at = accepted_at
        self.deadline = deadline
        self.head = bytearray()
        self.answered = False


class _Lobby:
    """Where new connections wait for their first byte, in one thread, with a selector.

    A connection that has sent something gets a thread (GuardedServer.give_thread)
    if one is free under the cap; otherwise this thread reads its request
    line (for the path label, so that the client's 503s and the server's add
    up per route), answers 503, lingers, and closes it. A connection that
    sends nothing within the header deadline is closed here, unanswered,
    having never cost a thread.
    """

    def __init__(self, server: GuardedServer) -> None:
        self._server = server
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._incoming: deque[tuple[socket.socket, Any, float]] = deque()  # append and popleft are atomic
        self._parked: dict[socket.socket, _Parked] = {}
        self._deadlines: list[tuple[float, int, socket.socket]] = []
        self._order = itertools.count()  # breaks ties in the heap: sockets don't compare
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="lobby", daemon=True)
        self._thread.start()

    def enter(self, sock: socket.socket, address: Any) -> None:
        sock.setblocking(False)
        self._incoming.append((sock, address, time.monotonic()))
        self._wake()

    def stop(self) -> None:
        self._stopped = True
        self._wake()
        self._thread.join(timeout=5)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already full of wake-ups: the thread will look
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        try:
            while not self._stopped:
                timeout = max(0.0, self._deadlines[0][0] - time.monotonic()) if self._deadlines else None
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            while self._wake_r.recv(4096):
                                pass
                    else:
                        self._readable(key.data)
                while self._incoming:
                    sock, address, accepted_at = self._incoming.popleft()
                    parked = _Parked(sock, address, accepted_at, accepted_at + self._server.header_timeout)
                    self._parked[sock] = parked
                    self._selector.register(sock, selectors.EVENT_READ, parked)
                    heapq.heappush(self._deadlines, (parked.deadline, next(self._order), sock))
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    deadline, _, sock = heapq.heappop(self._deadlines)
                    parked_now = self._parked.get(sock)
                    if parked_now is not None and parked_now.deadline == deadline:
                        self._close(parked_now, REFUSED if parked_now.answered else HEADER_TIMEOUT)
        finally:
            while self._incoming:
                sock, address, accepted_at = self._incoming.popleft()
                self._parked[sock] = _Parked(sock, address, accepted_at, 0.0)
            for parked in list(self._parked.values()):
                self._close(parked, REFUSED if parked.answered else SHUTDOWN)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _readable(self, parked: _Parked) -> None:
        if not parked.answered and not parked.head:
            try:
                first = parked.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                first = b""
            if not first:  # connected and left without a word
                self._close(parked, NORMAL)
                return
            self._forget(parked)
            if self._server.give_thread(parked.sock, parked.address, parked.accepted_at):
                return
            if self._is_scrape(parked) and self._server.give_thread(
                parked.sock, parked.address, parked.accepted_at, beyond=SCRAPE_THREADS
            ):
                return
            self._remember(parked)
        try:
            data = parked.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(parked, REFUSED if parked.answered else NORMAL)
        elif not parked.answered:
            parked.head += data
            if b"\n" in parked.head or len(parked.head) >= MAX_REFUSED_LINE:
                self._answer(parked)

    def _is_scrape(self, parked: _Parked) -> bool:
        """Whether the request line that has arrived asks for one of the server's scrape paths.

        Peeked, not read: the thread that serves it reads the request whole.
        """
        try:
            line = parked.sock.recv(MAX_REFUSED_LINE, socket.MSG_PEEK).partition(b"\n")[0]
        except OSError:
            return False
        words = line.split()
        return len(words) >= 2 and words[1].partition(b"?")[0].decode("latin-1") in self._server.scrape_paths

    def _answer(self, parked: _Parked) -> None:
        started = time.perf_counter()
        words = bytes(parked.head.partition(b"\n")[0]).split()
        method = words[0] if words else b""
        path = words[1].decode("latin-1") if len(words) >= 2 else None
        response = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(REFUSAL)}\r\n"
            f"Retry-After: {RETRY_AFTER}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        if method != b"HEAD":
            response += REFUSAL
        # Counted before it is sent, like every response (metrics.HTTPMetrics.finish).
        self._server.connections.refused()
        metrics = getattr(self._server.RequestHandlerClass, "metrics", None)
        if metrics is not None and (label := metrics.path_label(path)) is not None:
            metrics.observe(label, 503, time.perf_counter() - started)
        try:
            parked.sock.send(response)  # a fresh connection's send buffer takes it whole
            parked.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(parked, REFUSED)
            return
        parked.answered = True
        parked.deadline = time.monotonic() + LINGER
        heapq.heappush(self._deadlines, (parked.deadline, next(self._order), parked.sock))

    def _forget(self, parked: _Parked) -> None:
        del self._parked[parked.sock]
        self._selector.unregister(parked.sock)

    def _remember(self, parked: _Parked) -> None:
        self._parked[parked.sock] = parked
        self._selector.register(parked.sock, selectors.EVENT_READ, parked)

    def _close(self, parked: _Parked, reason: str) -> None:
        if self._parked.pop(parked.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(parked.sock)
        parked.sock.close()
        self._server.connections.closed(reason)
