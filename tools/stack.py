"""The monitoring stack without Docker: the app and a real Prometheus on loopback.

The same topology as docker-compose.yml, run natively with Debian's
``prometheus``: the configuration is derived from ``prometheus.yml`` (only the
targets, the rule-file directory and optionally the intervals differ) and the
same ``rules/*.yml`` are loaded. ``make stack`` runs it in the foreground; the
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
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    targets: Mapping[str, str | Path],
    source: Path = ROOT / "prometheus.yml",
    rules_dir: Path = ROOT / "rules",
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
) -> str:
    """prometheus.yml with each job's targets replaced by ``targets[job]``.

    A string is one static target ("host:port"); a Path is a file_sd_configs
    file listing the job's targets. Every job must be mapped, so a job added
    to prometheus.yml cannot silently go unscraped here.
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
    return yaml.safe_dump(config, sort_keys=False)


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
    """The running app replicas and Prometheus."""

    replicas: list[Replica]
    prometheus_url: str
    workdir: Path
    prometheus: subprocess.Popen[bytes]

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
        for name, process in [*processes, ("prometheus", self.prometheus)]:
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


def _start_app(host: str, port: int, app_args: Sequence[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    # Appended to: a restarted replica's log keeps what its predecessor said.
    start = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
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
        with log.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
        for line in lines:
            if LISTENING in line:
                # "listening on http://0.0.0.0:8080 (...)": keep host:port.
                return line.split(LISTENING, 1)[1].split()[0]
        return None

    try:
        address = wait_until(listening, 15, "the app to listen")
    except BaseException:
        stop_process(app)
        raise
    return app, int(address.rsplit(":", 1)[1])


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
) -> Iterator[Stack]:
    """Start replicas of the app and Prometheus on host; stop them all on exit.

    Ports 0 pick free ones; app_port P gives the replicas P, P+1, ... app_args
    go to hello_server.py (e.g. ["--failure-rate", "1"]). Logs and the TSDB
    live in workdir (a temporary directory, removed afterwards, unless given).
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
            prom_port = prometheus_port or _free_port(host)
            config = work / "prometheus.yml"
            config.write_text(
                render_config(
                    {"hello": targets, "prometheus": f"{host}:{prom_port}"},
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
            yield Stack(apps, prometheus_url, work, prometheus)
        finally:
            if prometheus is not None:
                stop_process(prometheus)
            for replica in apps:
                stop_process(replica.process)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


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
        *(f"app         {url}/hello   {url}/metrics" for url in stack.app_urls),
        f"prometheus  {prom}/graph?g0.expr={tutorial}&g0.tab=0",
        f"targets     {prom}/classic/targets",
        f"rules       {prom}/classic/rules",
        f"alerts      {prom}/classic/alerts",
        f"logs, TSDB  {stack.workdir}",
        "",
    ]
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
        "Ctrl-C stops them all." if len(stack.replicas) > 1 else "Ctrl-C stops both.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the app and Debian's prometheus on loopback until Ctrl-C.",
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
        ) as stack:
            print(banner(stack), flush=True)
            while not stop.wait(0.5):
                if stack.prometheus.poll() is not None:
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
