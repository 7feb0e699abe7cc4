"""The monitoring stack without Docker: the app, Prometheus and Alertmanager on loopback.

The same topology as docker-compose.yml, run natively with Debian's
``prometheus`` and ``prometheus-alertmanager``: the configurations are derived
from ``prometheus.yml`` (only the targets, the rule-file directory and
optionally the intervals differ) and ``alertmanager/alertmanager.yml`` (only
the webhook receiver's address and optionally the timings differ), and the
same ``rules/*.yml`` are loaded. Alerts reach tools/alert_receiver.py, which
writes one line per alert. ``make stack`` runs it in the foreground; the
end-to-end tests use ``native_stack()``.

``--replicas N`` runs N app processes on consecutive ports. Prometheus finds
them through a file_sd_configs file, the native counterpart of compose's DNS
and Kubernetes' endpoints discovery: the file lists every replica, and
Prometheus rereads it when it changes. A replica that exits is started again
on its port, as compose's restart policy and Kubernetes would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from promapi import query
from traffic import DEFAULT_URL

ROOT = Path(__file__).resolve().parent.parent
LISTENING = "listening on http://"
ALERTMANAGER_CONFIG = ROOT / "alertmanager" / "alertmanager.yml"
# The webhook receiver's address in alertmanager.yml, as compose names it.
RECEIVER = "alert-receiver:5001"
T = TypeVar("T")


class StackError(RuntimeError):
    """The stack could not start, or a wait on it timed out."""


def render_config(
    targets: Mapping[str, str | Path],
    source: Path = ROOT / "prometheus.yml",
    rules_dir: Path = ROOT / "rules",
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
    alertmanagers: Sequence[str] | None = None,
) -> str:
    """prometheus.yml with each job's targets replaced by ``targets[job]``.

    A string is one static target ("host:port"); a Path is a file_sd_configs
    file listing the job's targets. Every job must be mapped, so a job added
    to prometheus.yml cannot silently go unscraped here. ``alertmanagers``
    (host:port) replace the alerting block's targets; an empty list removes
    the block.
    """
    config = yaml.safe_load(source.read_text())
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name not in targets:
            raise StackError(f"prometheus.yml has job {name!r} that stack.py does not know; add it to the targets")
        # Whatever discovers the job's targets in Docker (DNS, static names)
        # gives way to the loopback addresses.
        for key in [k for k in job if k == "static_configs" or k.endswith("_sd_configs")]:
            del job[key]
        where = targets[name]
        if isinstance(where, Path):
            job["file_sd_configs"] = [{"files": [str(where)]}]
        else:
            job["static_configs"] = [{"targets": [where]}]
    # Container paths become the repository's rules directory.
    config["rule_files"] = [str(rules_dir / Path(pattern).name) for pattern in config.get("rule_files", [])]
    glob = config.setdefault("global", {})
    if scrape_interval:
        glob["scrape_interval"] = scrape_interval
    if evaluation_interval:
        glob["evaluation_interval"] = evaluation_interval
    if alertmanagers is not None:
        if not alertmanagers:
            config.pop("alerting", None)
        for entry in config.get("alerting", {}).get("alertmanagers", []):
            entry["static_configs"] = [{"targets": list(alertmanagers)}]
    return yaml.safe_dump(config, sort_keys=False)


def render_alertmanager_config(
    receiver: str,
    source: Path = ALERTMANAGER_CONFIG,
    timings: Mapping[str, str] | None = None,
) -> str:
    """alertmanager.yml with the project's webhook receiver at ``receiver`` (host:port).

    ``timings`` (group_wait, group_interval, repeat_interval) replace those
    of every route, so a test sees notifications within seconds.
    """
    config = yaml.safe_load(source.read_text())
    rewritten = 0
    for entry in config.get("receivers", []):
        for hook in entry.get("webhook_configs", []):
            url = urllib.parse.urlsplit(hook["url"])
            if url.netloc == RECEIVER:
                hook["url"] = url._replace(netloc=receiver).geturl()
                rewritten += 1
    if not rewritten:
        # Else the loopback Alertmanager would post to a host that does not
        # resolve here, and notifications would silently go nowhere.
        raise StackError(f"{source.name} has no webhook at {RECEIVER}; stack.py rewrites only that receiver's URL")
    routes = [config["route"]]
    while timings and routes:
        route = routes.pop()
        route.update(timings)
        routes.extend(route.get("routes", []))
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class Alerting:
    """A running Alertmanager and the webhook receiver it notifies."""

    alertmanager_url: str
    receiver_url: str
    # The receiver's output: one line per alert it was sent.
    notifications: Path
    alertmanager: subprocess.Popen[bytes]
    receiver: subprocess.Popen[bytes]

    @property
    def alertmanager_address(self) -> str:
        return urllib.parse.urlsplit(self.alertmanager_url).netloc

    def lines(self) -> list[str]:
        """Every notification line the receiver has written so far."""
        return self.notifications.read_text(errors="replace").splitlines()

    def alerts(self) -> list[dict[str, Any]]:
        """Alertmanager's view of its alerts (API v2), with each one's state and inhibitors."""
        try:
            with urllib.request.urlopen(f"{self.alertmanager_url}/api/v2/alerts", timeout=10) as response:
                return json.load(response)
        except urllib.error.URLError as e:
            raise StackError(f"cannot reach Alertmanager at {self.alertmanager_url}: {e.reason}") from e

    def running(self) -> bool:
        return self.alertmanager.poll() is None and self.receiver.poll() is None

    def stop(self) -> None:
        stop_process(self.alertmanager)
        stop_process(self.receiver)


@dataclass
class Replica:
    """One app process; its port stays when it is started again."""

    host: str
    port: int
    log: Path
    app_args: Sequence[str]
    process: subprocess.Popen[bytes]
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Stack:
    """The running app replicas and Prometheus, and Alertmanager unless started without."""

    replicas: list[Replica]
    prometheus_url: str
    workdir: Path
    prometheus: subprocess.Popen[bytes]
    alerting: Alerting | None = None

    @property
    def app_url(self) -> str:
        """The first replica's URL (the only one unless replicas > 1)."""
        return self.replicas[0].url

    @property
    def app_urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def app(self) -> subprocess.Popen[bytes]:
        return self.replicas[0].process

    def stopped(self) -> str | None:
        """Which process has exited on its own, if any."""
        processes = [(f"app replica {i + 1}", r.process) for i, r in enumerate(self.replicas)]
        processes.append(("prometheus", self.prometheus))
        if self.alerting:
            processes += [("alertmanager", self.alerting.alertmanager), ("the receiver", self.alerting.receiver)]
        for name, process in processes:
            if process.poll() is not None:
                return f"{name} exited with status {process.returncode}; see {self.workdir}"
        return None

    def revive(self) -> list[Replica]:
        """Start every replica that has exited again, on its port; the ones restarted.

        Like compose's restart policy: the new process counts from zero, and
        Prometheus sees a counter reset on the same target.
        """
        revived = []
        for replica in self.replicas:
            if replica.process.poll() is not None:
                replica.process, _ = _start_app(replica.host, replica.port, replica.app_args, replica.log)
                replica.restarts += 1
                revived.append(replica)
        return revived

    def wait_for_scrape(self, job: str = "hello", timeout: float = 30.0) -> None:
        """Block until Prometheus has scraped job successfully at least once."""
        wait_until(
            lambda: any(s["value"][1] == "1" for s in query(self.prometheus_url, f'up{{job="{job}"}}')),
            timeout,
            f"Prometheus to scrape job {job!r}",
        )


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll predicate until it returns something truthy; StackError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _free_port(host: str) -> int:
    # Prometheus cannot report a port it chose itself; a tiny race is the price.
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited after timeout seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _spawn(argv: Sequence[str], log: Path, stdout: Path | None = None, append: bool = False) -> subprocess.Popen[bytes]:
    """Start argv with stderr (and stdout, unless given its own file) in log."""
    mode = "ab" if append else "wb"
    with log.open(mode) as err, open(stdout or os.devnull, "wb") as out:
        return subprocess.Popen(
            argv,
            stdout=out if stdout else err,
            stderr=err if stdout else subprocess.STDOUT,
            # Out of the terminal's process group: a Ctrl-C reaches only the
            # program that owns the stack, which then stops them in order.
            start_new_session=True,
        )


def _listening(process: subprocess.Popen[bytes], log: Path, what: str, start: int = 0) -> str:
    """The host:port a process says it is "listening on" in its log (from byte start); stops it on failure."""

    def address() -> str | None:
        if process.poll() is not None:
            raise StackError(f"{what} exited with status {process.returncode}:\n{_tail(log)}")
        with log.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
        for line in lines:
            if LISTENING in line:
                # "listening on http://0.0.0.0:8080 (...)": keep host:port.
                return line.split(LISTENING, 1)[1].split()[0]
        return None

    try:
        return wait_until(address, 15, f"{what} to listen")
    except BaseException:
        stop_process(process)
        raise


def _start_server(
    name: str, binary: str, config: Path, host: str, port: int, workdir: Path, flags: Sequence[str]
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a Prometheus or an Alertmanager (they share these flags) and wait until it is ready.

    Its log is workdir/NAME.log; returns the process and its base URL.
    """
    url = f"http://{host}:{port}"
    log = workdir / f"{name}.log"
    process = _spawn(
        [
            binary,
            f"--config.file={config}",
            f"--web.listen-address={host}:{port}",
            # The links in notifications and alerts, instead of this machine's hostname.
            f"--web.external-url={url}",
            "--log.level=warn",
            *flags,
        ],
        log,
    )
    try:
        _wait_ready(process, f"{url}/-/ready", log, name)
    except BaseException:
        stop_process(process)
        raise
    return process, url


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, what: str) -> None:
    """Block until url answers 200; StackError if the process exits first."""

    def ready() -> bool:
        if process.poll() is not None:
            raise StackError(f"{what} exited with status {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(ready, 30, f"{what} to be ready")


def _start_app(host: str, port: int, app_args: Sequence[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    # Appended to: a restarted replica's log keeps what its predecessor said.
    start = log.stat().st_size if log.exists() else 0
    argv = [sys.executable, str(ROOT / "hello_server.py"), "--host", host, "--port", str(port), *app_args]
    app = _spawn(argv, log, append=True)
    return app, int(_listening(app, log, "the app", start).rsplit(":", 1)[1])


def start_alerting(
    host: str,
    workdir: Path,
    alertmanager_port: int = 0,
    receiver_port: int = 0,
    timings: Mapping[str, str] | None = None,
) -> Alerting:
    """Start the webhook receiver and Alertmanager (routing to it) on host; call .stop() after.

    Alertmanager keeps silences and its notification log in workdir and runs
    alone: an empty --cluster.listen-address turns off the gossip that
    replicas use to share them.
    """
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        raise StackError("prometheus-alertmanager is not installed: `make tools` installs Debian's package")
    receiver_log = workdir / "alert-receiver.log"
    notifications = workdir / "notifications.log"
    receiver = _spawn(
        [sys.executable, str(ROOT / "tools" / "alert_receiver.py"), "--host", host, "--port", str(receiver_port)],
        receiver_log,
        stdout=notifications,
    )
    receiver_address = _listening(receiver, receiver_log, "the alert receiver")
    try:
        port = alertmanager_port or _free_port(host)
        config = workdir / "alertmanager.yml"
        config.write_text(render_alertmanager_config(receiver_address, timings=timings))
        alertmanager, url = _start_server(
            "alertmanager",
            binary,
            config,
            host,
            port,
            workdir,
            [f"--storage.path={workdir / 'alertmanager'}", "--cluster.listen-address="],
        )
    except BaseException:
        stop_process(receiver)
        raise
    return Alerting(url, f"http://{receiver_address}", notifications, alertmanager, receiver)


@contextmanager
def native_stack(
    app_args: Sequence[str] = (),
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
    app_port: int = 0,
    prometheus_port: int = 0,
    host: str = "127.0.0.1",
    workdir: Path | None = None,
    replicas: int = 1,
    alerting: bool = False,
    alertmanager_port: int = 0,
    receiver_port: int = 0,
    alertmanager_timings: Mapping[str, str] | None = None,
    rules_dir: Path = ROOT / "rules",
    alert_resend_delay: str | None = None,
) -> Iterator[Stack]:
    """Start replicas of the app, Prometheus and (with alerting) Alertmanager; stop them all on exit.

    Ports 0 pick free ones; app_port P gives the replicas P, P+1, ... app_args
    go to hello_server.py (e.g. ["--failure-rate", "1"]). Logs and the TSDB
    live in workdir (a temporary directory, removed afterwards, unless given).
    rules_dir replaces rules/ (a test's copy with shorter `for`s);
    alertmanager_timings see render_alertmanager_config.
    """
    if replicas < 1:
        raise StackError(f"replicas must be at least 1, not {replicas}")
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("prometheus is not installed: `make tools` installs Debian's package")
    with tempfile.TemporaryDirectory(prefix="hello-stack-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        apps: list[Replica] = []
        prometheus = None
        alerts = None
        try:
            for i in range(replicas):
                log = work / ("app.log" if replicas == 1 else f"app-{i + 1}.log")
                process, port = _start_app(host, app_port + i if app_port else 0, app_args, log)
                apps.append(Replica(host, port, log, tuple(app_args), process))
            # The replicas' addresses for Prometheus' file discovery, written
            # whole and renamed into place: it never reads half a file.
            targets = work / "targets" / "hello.json"
            targets.parent.mkdir(exist_ok=True)
            partial = targets.with_suffix(".tmp")
            partial.write_text(json.dumps([{"targets": [f"{host}:{r.port}" for r in apps]}], indent=2) + "\n")
            partial.replace(targets)
            if alerting:
                alerts = start_alerting(host, work, alertmanager_port, receiver_port, alertmanager_timings)
            prom_port = prometheus_port or _free_port(host)
            config = work / "prometheus.yml"
            config.write_text(
                render_config(
                    {"hello": targets, "prometheus": f"{host}:{prom_port}"},
                    rules_dir=rules_dir,
                    scrape_interval=scrape_interval,
                    evaluation_interval=evaluation_interval,
                    alertmanagers=[alerts.alertmanager_address] if alerts else [],
                )
            )
            prometheus, prometheus_url = _start_server(
                "prometheus",
                binary,
                config,
                host,
                prom_port,
                work,
                [
                    f"--storage.tsdb.path={work / 'data'}",
                    # As in docker-compose.yml: keep the latency histogram's exemplars.
                    "--enable-feature=exemplar-storage",
                    # Alerts evaluated before the Alertmanager is discovered
                    # (~5 s after start) are dropped and sent again only after
                    # this delay (default 1m): tests shorten it.
                    *([f"--rules.alert.resend-delay={alert_resend_delay}"] if alert_resend_delay else []),
                ],
            )
            yield Stack(apps, prometheus_url, work, prometheus, alerts)
        finally:
            if prometheus is not None:
                stop_process(prometheus)
            if alerts is not None:
                alerts.stop()
            for replica in apps:
                stop_process(replica.process)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


# The Makefile's defaults: its `make load`, `make queries` and `make report`
# reach the stack only on these.
MAKE_APP_URL = DEFAULT_URL.removesuffix("/hello")
MAKE_PROMETHEUS = "http://localhost:9090"
MAKE_LOAD_ARGS = "--rate 100 --duration 30 --audit"


def banner(stack: Stack) -> str:
    """Where everything is, and the commands that reach this stack's ports."""
    app, prom = stack.app_url, stack.prometheus_url
    tutorial = urllib.parse.quote('rate(http_requests_total{path="/hello"}[1m])')
    rows = [
        *(("app", f"{url}/hello   {url}/metrics") for url in stack.app_urls),
        ("prometheus", f"{prom}/graph?g0.expr={tutorial}&g0.tab=0"),
        ("targets", f"{prom}/classic/targets"),
        ("rules", f"{prom}/classic/rules"),
        ("alerts", f"{prom}/classic/alerts"),
    ]
    if stack.alerting:
        rows.append(("alertmanager", stack.alerting.alertmanager_url))
        rows.append(("notifications", str(stack.alerting.notifications)))
    rows.append(("logs, TSDB", str(stack.workdir)))
    lines = [*(f"{label:<13} {value}" for label, value in rows), ""]
    same_app = urllib.parse.urlsplit(app).port == urllib.parse.urlsplit(MAKE_APP_URL).port
    same_prom = urllib.parse.urlsplit(prom).port == urllib.parse.urlsplit(MAKE_PROMETHEUS).port
    if len(stack.replicas) > 1:
        # Every replica gets its share, and the audit sums over them.
        urls = " ".join(f"{url}/hello" for url in stack.app_urls)
        load = f'make load LOAD_ARGS="{urls} {MAKE_LOAD_ARGS}"'
    elif same_app:
        load = "make load"
    else:
        load = f'make load LOAD_ARGS="{app}/hello {MAKE_LOAD_ARGS}"'
    given = "" if same_prom else f" PROMETHEUS={prom}"
    lines += [
        "In another terminal:",
        f"  {load}",
        f"  make queries{given}",
        f"  make report{given}",
        "Ctrl-C stops both." if len(stack.replicas) == 1 and not stack.alerting else "Ctrl-C stops them all.",
    ]
    if stack.alerting:
        lines[-1] += " Notifications follow, one line per alert:"
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the app, Debian's prometheus and prometheus-alertmanager on loopback until Ctrl-C.",
        epilog="Arguments after -- go to hello_server.py, e.g. `-- --failure-rate 0.5`.",
    )
    parser.add_argument("--app-port", type=int, default=8080, help="the first replica's port (default %(default)s)")
    parser.add_argument(
        "--replicas",
        type=_at_least_one,
        default=1,
        help="app processes, on consecutive ports from --app-port (default %(default)s)",
    )
    parser.add_argument("--prometheus-port", type=int, default=9090, help="default %(default)s")
    parser.add_argument("--alertmanager-port", type=int, default=9093, help="default %(default)s")
    parser.add_argument("--receiver-port", type=int, default=5001, help="the webhook receiver's (default %(default)s)")
    parser.add_argument("--scrape-interval", help="override prometheus.yml's (e.g. 1s)")
    parser.add_argument("--workdir", type=Path, help="keep logs and the TSDB here instead of a temporary directory")
    parser.add_argument("app_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with native_stack(
            app_args=["--access-log", "off", *args.app_args],
            scrape_interval=args.scrape_interval,
            evaluation_interval=args.scrape_interval,
            app_port=args.app_port,
            prometheus_port=args.prometheus_port,
            workdir=args.workdir,
            replicas=args.replicas,
            alerting=True,
            alertmanager_port=args.alertmanager_port,
            receiver_port=args.receiver_port,
        ) as stack:
            assert stack.alerting is not None
            print(banner(stack), flush=True)
            with stack.alerting.notifications.open() as notifications:
                while not stop.wait(0.5):
                    # What the webhook receiver writes, as it arrives.
                    print("".join(notifications.readlines()), end="", flush=True)
                    if stack.prometheus.poll() is not None or not stack.alerting.running():
                        print(f"stack: {stack.stopped()}", file=sys.stderr)
                        return 1
                    # A replica that died is started again, as a restart policy would.
                    for replica in stack.revive():
                        print(f"stack: the app on port {replica.port} exited; started it again", file=sys.stderr)
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        return 1
    print("stack: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
