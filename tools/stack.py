"""The monitoring stack without Docker: the app and a real Prometheus on loopback.

The same topology as docker-compose.yml, run natively with Debian's
``prometheus``: the configuration is derived from ``prometheus.yml`` (only the
targets, the rule-file directory and optionally the intervals differ) and the
same ``rules/*.yml`` are loaded. ``make stack`` runs it in the foreground; the
end-to-end tests use ``native_stack()``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from promapi import query

ROOT = Path(__file__).resolve().parent.parent
LISTENING = "listening on http://"
T = TypeVar("T")


class StackError(RuntimeError):
    """The stack could not start, or a wait on it timed out."""


def render_config(
    targets: dict[str, str],
    source: Path = ROOT / "prometheus.yml",
    rules_dir: Path = ROOT / "rules",
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
) -> str:
    """prometheus.yml with each job's targets replaced by ``targets[job]``.

    Every job must be mapped, so a job added to prometheus.yml cannot silently
    go unscraped here.
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
        job["static_configs"] = [{"targets": [targets[name]]}]
    # Container paths become the repository's rules directory.
    config["rule_files"] = [str(rules_dir / Path(pattern).name) for pattern in config.get("rule_files", [])]
    glob = config.setdefault("global", {})
    if scrape_interval:
        glob["scrape_interval"] = scrape_interval
    if evaluation_interval:
        glob["evaluation_interval"] = evaluation_interval
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class Stack:
    """A running app and Prometheus."""

    app_url: str
    prometheus_url: str
    workdir: Path
    app: subprocess.Popen[bytes]
    prometheus: subprocess.Popen[bytes]

    def stopped(self) -> str | None:
        """Which process has exited on its own, if any."""
        for name, process in (("the app", self.app), ("prometheus", self.prometheus)):
            if process.poll() is not None:
                return f"{name} exited with status {process.returncode}; see {self.workdir}"
        return None

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


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_app(host: str, port: int, app_args: Sequence[str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = workdir / "app.log"
    with log.open("wb") as out:
        app = subprocess.Popen(
            [sys.executable, str(ROOT / "hello_server.py"), "--host", host, "--port", str(port), *app_args],
            stdout=out,
            stderr=subprocess.STDOUT,
            # Out of the terminal's process group: a Ctrl-C reaches only the
            # program that owns the stack, which then stops both in order.
            start_new_session=True,
        )

    def listening() -> str | None:
        if app.poll() is not None:
            raise StackError(f"the app exited with status {app.returncode}:\n{_tail(log)}")
        for line in log.read_text(errors="replace").splitlines():
            if LISTENING in line:
                # "listening on http://0.0.0.0:8080 (...)": keep host:port.
                return line.split(LISTENING, 1)[1].split()[0]
        return None

    try:
        address = wait_until(listening, 15, "the app to listen")
    except BaseException:
        _stop(app)
        raise
    return app, address.rsplit(":", 1)[1]


@contextmanager
def native_stack(
    app_args: Sequence[str] = (),
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
    app_port: int = 0,
    prometheus_port: int = 0,
    host: str = "127.0.0.1",
    workdir: Path | None = None,
) -> Iterator[Stack]:
    """Start the app and Prometheus on host; stop both on exit.

    Ports 0 pick free ones. app_args go to hello_server.py (e.g.
    ["--failure-rate", "1"]). Logs and the TSDB live in workdir (a temporary
    directory, removed afterwards, unless given).
    """
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("prometheus is not installed: `make tools` installs Debian's package")
    with tempfile.TemporaryDirectory(prefix="hello-stack-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        app, port = _start_app(host, app_port, app_args, work)
        prometheus = None
        try:
            prom_port = prometheus_port or _free_port(host)
            config = work / "prometheus.yml"
            config.write_text(
                render_config(
                    {"hello": f"{host}:{port}", "prometheus": f"{host}:{prom_port}"},
                    scrape_interval=scrape_interval,
                    evaluation_interval=evaluation_interval,
                )
            )
            log = work / "prometheus.log"
            with log.open("wb") as out:
                prometheus = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={work / 'data'}",
                        f"--web.listen-address={host}:{prom_port}",
                        # As in docker-compose.yml: keep the latency histogram's exemplars.
                        "--enable-feature=exemplar-storage",
                        "--log.level=warn",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            prometheus_url = f"http://{host}:{prom_port}"

            def ready() -> bool:
                if prometheus.poll() is not None:
                    raise StackError(f"prometheus exited with status {prometheus.returncode}:\n{_tail(log)}")
                try:
                    with urllib.request.urlopen(f"{prometheus_url}/-/ready", timeout=2) as response:
                        return response.status == 200
                except OSError:
                    return False

            wait_until(ready, 30, "Prometheus to be ready")
            yield Stack(f"http://{host}:{port}", prometheus_url, work, app, prometheus)
        finally:
            if prometheus is not None:
                _stop(prometheus)
            _stop(app)


# The Makefile's defaults: its `make load`, `make queries` and `make report`
# reach the stack only on these.
MAKE_APP_URL = "http://127.0.0.1:8080"
MAKE_PROMETHEUS = "http://localhost:9090"
MAKE_LOAD_ARGS = "--rate 100 --duration 30 --audit"


def banner(stack: Stack) -> str:
    """Where everything is, and the commands that reach this stack's ports."""
    app, prom = stack.app_url, stack.prometheus_url
    tutorial = urllib.parse.quote('rate(http_requests_total{path="/hello"}[1m])')
    lines = [
        f"app         {app}/hello   {app}/metrics",
        f"prometheus  {prom}/graph?g0.expr={tutorial}&g0.tab=0",
        f"targets     {prom}/classic/targets",
        f"rules       {prom}/classic/rules",
        f"alerts      {prom}/classic/alerts",
        f"logs, TSDB  {stack.workdir}",
        "",
    ]
    same_app = urllib.parse.urlsplit(app).port == urllib.parse.urlsplit(MAKE_APP_URL).port
    same_prom = urllib.parse.urlsplit(prom).port == urllib.parse.urlsplit(MAKE_PROMETHEUS).port
    load = "make load" if same_app else f'make load LOAD_ARGS="{app}/hello {MAKE_LOAD_ARGS}"'
    given = "" if same_prom else f" PROMETHEUS={prom}"
    lines += [
        "In another terminal:",
        f"  {load}",
        f"  make queries{given}",
        f"  make report{given}",
        "Ctrl-C stops both.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the app and Debian's prometheus on loopback until Ctrl-C.",
        epilog="Arguments after -- go to hello_server.py, e.g. `-- --failure-rate 0.5`.",
    )
    parser.add_argument("--app-port", type=int, default=8080, help="default %(default)s")
    parser.add_argument("--prometheus-port", type=int, default=9090, help="default %(default)s")
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
        ) as stack:
            print(banner(stack), flush=True)
            while not stop.wait(0.5):
                if problem := stack.stopped():
                    print(f"stack: {problem}", file=sys.stderr)
                    return 1
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        return 1
    print("stack: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
