"""A webhook receiver for Alertmanager that writes one line per alert it is sent.

Alertmanager POSTs each notification (a group of alerts, version 4 of its
webhook payload) here; every alert in it becomes one logfmt line on stdout:

    ts=2026-11-26T12:40:03Z status=firing alertname=HelloTargetDown severity=page
    receiver=page instance=app:8080 job=hello summary="Prometheus cannot scrape ..."

(one line, wrapped here), easy to read and to grep. It is the out-of-the-box
receiver of both stacks (docker compose logs alert-receiver; make stack shows
the lines), and a stand-in until a real one (PagerDuty, Slack, e-mail) is
configured in alertmanager/alertmanager.yml.

It also watches the dead man's switch: when no Watchdog notification has
arrived for --watchdog-timeout seconds, it writes a status=missing line for
it, and again after each further timeout, until one arrives.

Standard library only, so it runs in any Python 3.11 image. GET /-/healthy
answers 200 for health checks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

# Alertmanager's payloads are a few KB per alert; this bounds a bad client.
MAX_BODY = 4 * 1024 * 1024
WATCHDOG = "Watchdog"


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 5001
    watchdog_timeout: float = 300.0


def _logfmt(value: str) -> str:
    # Bare when unambiguous, else a JSON string (quotes and newlines escaped).
    if value and not any(c.isspace() or c in '"=\\' for c in value) and value.isprintable():
        return value
    return json.dumps(value, ensure_ascii=False)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def format_line(fields: Iterable[tuple[str, str]]) -> str:
    return " ".join(f"{key}={_logfmt(str(value))}" for key, value in fields)


def alert_lines(payload: Mapping[str, Any], now: str) -> list[str]:
    """One line per alert of a webhook payload: status, alertname, severity, receiver, labels, summary."""
    if payload.get("version") != "4" or not isinstance(payload.get("alerts"), list):
        raise ValueError("not an Alertmanager webhook payload (version 4 with a list of alerts)")
    lines = []
    for alert in payload["alerts"]:
        labels = dict(alert.get("labels", {}))
        head = [
            ("ts", now),
            ("status", alert.get("status", payload.get("status", ""))),
            ("alertname", labels.pop("alertname", "")),
            ("severity", labels.pop("severity", "")),
            ("receiver", payload.get("receiver", "")),
        ]
        summary = alert.get("annotations", {}).get("summary", "")
        lines.append(format_line([*head, *sorted(labels.items()), ("summary", summary)]))
    return lines


class Output:
    """Where lines go: whole lines, one writer at a time, flushed at once."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.last_watchdog = time.monotonic()

    def write(self, lines: Sequence[str], watchdog: bool = False) -> None:
        with self._lock:
            if watchdog:
                self.last_watchdog = time.monotonic()
            for line in lines:
                self._stream.write(line + "\n")
            self._stream.flush()


class Handler(BaseHTTPRequestHandler):
    server_version = "alert_receiver"
    protocol_version = "HTTP/1.1"
    # Per socket operation: a client that stops sending frees its thread.
    timeout = 30
    output: Output  # set by make_server

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            # read(-1) would wait for the client to close the connection.
            self._reply(HTTPStatus.BAD_REQUEST, "a Content-Length is required\n")
            self.close_connection = True
            return
        if length > MAX_BODY:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes\n")
            self.close_connection = True
            return
        try:
            payload = json.loads(self.rfile.read(length))
            lines = alert_lines(payload, _now())
        except (ValueError, AttributeError, TypeError) as e:
            # 4xx: Alertmanager does not retry what can never succeed.
            self._reply(HTTPStatus.BAD_REQUEST, f"{e}\n")
            return
        names = {alert.get("labels", {}).get("alertname") for alert in payload["alerts"]}
        self.output.write(lines, watchdog=WATCHDOG in names)
        self._reply(HTTPStatus.OK, "")

    def do_GET(self) -> None:
        if self.path == "/-/healthy":
            self._reply(HTTPStatus.OK, "OK\n")
        else:
            self._reply(HTTPStatus.NOT_FOUND, "POST Alertmanager webhooks to any path; GET /-/healthy\n")

    def _reply(self, status: HTTPStatus, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # The notification lines are the log; a line per POST would double it.
        pass


def make_server(config: Config, output: Output) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"output": output})
    server = ThreadingHTTPServer((config.host, config.port), handler)
    server.daemon_threads = True
    return server


def watch_watchdog(output: Output, timeout: float, stop: threading.Event) -> None:
    """Write a status=missing line for Watchdog each time timeout seconds pass without one."""
    while not stop.wait(min(timeout, 1.0)):
        silent = time.monotonic() - output.last_watchdog
        if silent >= timeout:
            summary = (
                f"no {WATCHDOG} notification for {silent:.0f} s: Prometheus is down or not evaluating rules, "
                "cannot reach Alertmanager, or Alertmanager cannot deliver"
            )
            fields = [("ts", _now()), ("status", "missing"), ("alertname", WATCHDOG), ("summary", summary)]
            output.write([format_line(fields)], watchdog=True)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    return port


def _seconds(text: str) -> float:
    seconds = float(text)
    if not seconds >= 0:
        raise ValueError(text)
    return seconds


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Flags, each defaulting to a HELLO_RECEIVER_* environment variable; exit status 2 on a bad value.

    The same scheme as hello_server.parse_args, repeated rather than imported:
    compose mounts this file alone into a bare Python image.
    """
    env = os.environ if environ is None else environ
    d = Config()
    parser = argparse.ArgumentParser(
        description="Receive Alertmanager webhooks; write one line per alert on stdout.",
        epilog="Every flag defaults to the HELLO_RECEIVER_* environment variable named in its help.",
    )

    def option(flag: str, kind: Callable[[str], object], default: object, text: str) -> None:
        var = "HELLO_RECEIVER_" + flag[2:].upper().replace("-", "_")
        value = env.get(var) or str(default)
        if env.get(var):
            try:
                kind(value)
            except ValueError:
                parser.error(f"environment variable {var}: invalid {kind.__name__} value: {value!r}")
        parser.add_argument(flag, type=kind, default=value, help=f"{text} ({var}, default: %(default)s)")

    option("--host", str, d.host, "address to bind")
    option("--port", _port, d.port, "port; 0 picks a free one")
    option("--watchdog-timeout", _seconds, d.watchdog_timeout, "seconds without Watchdog before a missing line; 0 off")
    return Config(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    output = Output(sys.stdout)
    try:
        server = make_server(config, output)
    except OSError as e:
        print(f"alert_receiver: cannot listen on {config.host}:{config.port}: {e.strerror}", file=sys.stderr)
        return 1
    # shutdown() waits for serve_forever, so it must run in another thread;
    # as a container's PID 1, SIGTERM does nothing without a handler.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=server.shutdown).start())
    stop = threading.Event()
    if config.watchdog_timeout > 0:
        threading.Thread(target=watch_watchdog, args=(output, config.watchdog_timeout, stop), daemon=True).start()
    host, port = server.server_address[:2]
    print(f"alert_receiver: listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        stop.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
