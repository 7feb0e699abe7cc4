"""tools/alert_receiver.py over loopback: exact lines from Alertmanager's webhook payloads."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import alert_receiver
import stack

ROOT = Path(__file__).resolve().parent.parent

# What Alertmanager 0.25 posts (webhook payload version 4), trimmed to what matters.
PAYLOAD = {
    "version": "4",
    "groupKey": '{}/{severity="page"}:{alertname="HelloTargetDown", job="hello"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "page",
    "groupLabels": {"alertname": "HelloTargetDown", "job": "hello"},
    "commonLabels": {"alertname": "HelloTargetDown", "job": "hello", "severity": "page"},
    "commonAnnotations": {},
    "externalURL": "http://127.0.0.1:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "HelloTargetDown", "instance": "app:8080", "job": "hello", "severity": "page"},
            "annotations": {"summary": "Prometheus cannot scrape hello at app:8080", "description": "..."},
            "startsAt": "2026-11-26T12:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://127.0.0.1:9090/graph",
            "fingerprint": "1",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "HelloTargetDown", "instance": "app 2", "job": "hello", "severity": "page"},
            "annotations": {"summary": 'said "gone"\nthen came back'},
            "startsAt": "2026-11-26T11:00:00Z",
            "endsAt": "2026-11-26T11:30:00Z",
            "generatorURL": "http://127.0.0.1:9090/graph",
            "fingerprint": "2",
        },
    ],
}
NOW = "2026-11-26T12:00:05Z"


class Receiver:
    def __init__(self, watchdog_timeout: float = 0) -> None:
        self.stream = io.StringIO()
        self.output = alert_receiver.Output(self.stream)
        self.server = alert_receiver.make_server(alert_receiver.Config(port=0), self.output)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.server.serve_forever)]
        if watchdog_timeout:
            args = (self.output, watchdog_timeout, self.stop)
            self.threads.append(threading.Thread(target=alert_receiver.watch_watchdog, args=args))

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def post(self, body: bytes) -> tuple[int, str]:
        request = urllib.request.Request(self.url + "/", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    for thread in running.threads:
        thread.start()
    yield running
    running.stop.set()
    running.server.shutdown()
    running.server.server_close()


def test_one_line_per_alert_with_status_name_severity_receiver_labels_summary():
    assert alert_receiver.alert_lines(PAYLOAD, NOW) == [
        "ts=2026-11-26T12:00:05Z status=firing alertname=HelloTargetDown severity=page receiver=page "
        'instance=app:8080 job=hello summary="Prometheus cannot scrape hello at app:8080"',
        "ts=2026-11-26T12:00:05Z status=resolved alertname=HelloTargetDown severity=page receiver=page "
        'instance="app 2" job=hello summary="said \\"gone\\"\\nthen came back"',
    ]


def test_a_posted_notification_is_written_and_answered_200(receiver):
    assert receiver.post(json.dumps(PAYLOAD).encode()) == (200, "")
    lines = receiver.lines()
    assert len(lines) == 2
    assert lines[0].split(" ", 1)[1] == alert_receiver.alert_lines(PAYLOAD, NOW)[0].split(" ", 1)[1]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "Expecting property name"),
        (json.dumps({**PAYLOAD, "version": "3"}).encode(), "not an Alertmanager webhook payload"),
        (b"[]", "'list' object has no attribute 'get'"),
    ],
)
def test_what_is_not_a_webhook_payload_is_refused_with_400_and_not_written(receiver, body, error):
    status, text = receiver.post(body)
    assert status == 400
    assert error in text
    assert receiver.lines() == []


def test_a_bad_content_length_is_refused_at_once(receiver):
    with socket.create_connection(("127.0.0.1", receiver.server.server_address[1]), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 400 ")
    assert receiver.lines() == []


def test_health_check(receiver):
    with urllib.request.urlopen(receiver.url + "/-/healthy", timeout=10) as response:
        assert (response.status, response.read()) == (200, b"OK\n")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(receiver.url + "/alerts", timeout=10)
    assert e.value.code == 404


def test_a_missing_watchdog_is_reported_until_one_arrives():
    running = Receiver(watchdog_timeout=0.3)
    for thread in running.threads:
        thread.start()
    try:
        stack.wait_until(running.lines, 10, "a line about the missing Watchdog")
        [line] = running.lines()[:1]
        assert line.split(" ", 3)[1:3] == ["status=missing", "alertname=Watchdog"]
        assert 'summary="no Watchdog notification for 0 s: Prometheus is down' in line
        watchdog = {
            **PAYLOAD,
            "receiver": "watchdog",
            "alerts": [{"status": "firing", "labels": {"alertname": "Watchdog"}, "annotations": {}}],
        }
        assert running.post(json.dumps(watchdog).encode())[0] == 200
        # From then on, a missing line only after another full timeout.
        assert running.output.last_watchdog >= time.monotonic() - 0.3
    finally:
        running.stop.set()
        running.server.shutdown()
        running.server.server_close()


def test_flags_default_to_the_environment_and_a_bad_value_exits_2(capsys):
    config = alert_receiver.parse_args([], {"HELLO_RECEIVER_PORT": "6000", "HELLO_RECEIVER_HOST": "0.0.0.0"})
    assert config == alert_receiver.Config(host="0.0.0.0", port=6000, watchdog_timeout=300.0)
    with pytest.raises(SystemExit) as e:
        alert_receiver.parse_args([], {"HELLO_RECEIVER_PORT": "70000"})
    assert e.value.code == 2
    assert "environment variable HELLO_RECEIVER_PORT: invalid _port value: '70000'" in capsys.readouterr().err


def test_sigterm_stops_it_with_status_0():
    # As a container's PID 1 it must handle SIGTERM itself.
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "alert_receiver.py"), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        assert process.stderr.readline().startswith("alert_receiver: listening on http://127.0.0.1:")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
