"""`make bench`: what the monitoring costs the service, and what the service holds.

Four measurements, each against the real server in a subprocess on 127.0.0.1,
the server pinned to core 0 and the load tool to core 1 (when there are two):

1. overhead: /hello with no delay and no failures, 50 keep-alive connections
   (wrk), the instrumented server against the very same HelloHandler composed
   without ``metrics.instrument``, in alternating runs: requests/s and the ratio.
2. tutorial: the tutorial's workload (delay 0-1 s, 20% failures) at 500 and
   2,000 connections (wrk): achieved requests/s against the ideal
   (connections / 0.5 s mean delay), transport errors, peak RSS and threads.
3. scrape: /metrics time (median, p99) and size, plain and gzip.
4. loadgen: the project's load generator against hey, same server, same workload.
5. impolite clients, against the server's default connection settings: RSS
   and threads with 0, 1,000 and 10,000 silent connections and with 10,000
   kept alive after a request; a polite client's answer time while 5,000
   silent and 200 slowloris connections are held; the time to refuse a
   request past the connection cap (median, p99).

Absolute numbers drift on a shared machine; ratios measured in one run hold.
Prints a table and writes the numbers as JSON (``--json``, default build/bench.json).

``python tools/bench.py serve-uninstrumented [hello_server flags]`` is the
uninstrumented server that measurement 1 compares against; ``python tools/bench.py
profile`` (``make profile``) shows where the instrumented fast path spends its
time, with py-spy; ``python tools/bench.py instructions`` counts the CPU instructions
of one /hello request through each handler with callgrind (needs valgrind).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
# The server under test lives at the repository root, beside this folder.
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"
SERVER_CORE, LOAD_CORE = 0, 1
PINNED = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGET_OVERHEAD = 0.95  # instrumented / uninstrumented throughput
TARGET_TUTORIAL = 0.95  # achieved / ideal at 2,000 connections, with zero transport errors
TARGET_SCRAPE_MS = 2.0  # median /metrics time
TARGET_LOADGEN = 0.9  # loadgen rate / hey rate
TARGET_RSS_MIB = 256  # the Deployment's memory limit (k8s/app), 256 Mi


# --- the uninstrumented server ------------------------------------------------


def serve_uninstrumented(argv: Sequence[str]) -> int:
    """hello_server's main(), serving HelloHandler without metrics.instrument."""
    import hello_server

    return hello_server.main(argv, instrumented=False)


# --- processes ----------------------------------------------------------------


def _pin(core: int):
    if not PINNED:
        return None
    return lambda: os.sched_setaffinity(0, {core})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A hello server subprocess on a free loopback port, pinned to SERVER_CORE."""

    def __init__(
        self, instrumented: bool = True, max_delay: float = 0.0, failure_rate: float = 0.0, *extra: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        entry = [str(ROOT / "hello_server.py")] if instrumented else [str(TOOLS / "bench.py"), "serve-uninstrumented"]
        flags = ["--host", HOST, "--port", str(self.port), "--max-delay", str(max_delay)]
        flags += ["--failure-rate", str(failure_rate), "--access-log", "off", "--grace-period", "2", *extra]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_pin(SERVER_CORE),
        )
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM (peak RSS) in KiB and Threads, from /proc."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Peak:
    """Samples a server's RSS and thread count every 100 ms while running."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.rss_kib = self.threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(OSError, ValueError):
                s = self.server.status()
                self.rss_kib = max(self.rss_kib, s["VmHWM"])
                self.threads = max(self.threads, s["Threads"])

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_tool(cmd: Sequence[str], seconds: float) -> str:
    """Run a load tool pinned to LOAD_CORE; its stdout. Bounded: killed after seconds + 30."""
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 30, preexec_fn=_pin(LOAD_CORE), check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


# --- load tools ---------------------------------------------------------------


def wrk(url: str, connections: int, seconds: int, timeout: int = 5) -> dict[str, Any]:
    out = run_tool(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout}s", url],
        seconds,
    )
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if not m:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    requests, took = int(m.group(1)), float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if e := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors = dict(zip(errors, map(int, e.groups()), strict=True))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": requests,
        "seconds": took,
        "rate": requests / took,
        "transport_errors": errors,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def hey(url: str, concurrency: int, seconds: int) -> dict[str, Any]:
    out = run_tool(["hey", "-c", str(concurrency), "-z", f"{seconds}s", "-t", "10", url], seconds)
    statuses = {code: int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s+\S+ ", out.partition("Error distribution")[2], re.M))
    took = float(re.search(r"Total:\s+([\d.]+) secs", out).group(1))  # type: ignore[union-attr]
    responses = sum(statuses.values())
    return {"responses": responses, "seconds": took, "rate": responses / took, "statuses": statuses, "errors": errors}


def loadgen(url: str, concurrency: int, seconds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "loadgen.json"
        cmd = [sys.executable, str(TOOLS / "loadgen.py"), url, "--concurrency", str(concurrency)]
        run_tool([*cmd, "--duration", str(seconds), "--json", str(path), "--quiet"], seconds)
        s = json.loads(path.read_text())
    return {
        "responses": s["responses"],
        "seconds": s["elapsed_seconds"],
        "rate": s["response_rate"],
        "statuses": s["statuses"],
        "errors": s["timeouts"] + sum(s["transport_errors"].values()),
    }


def requests_counted(url: str) -> float:
    """http_requests_total{path="/hello"} from the server's own /metrics."""
    with contextlib.closing(http.client.HTTPConnection(HOST, int(url.rsplit(":", 1)[1]), timeout=10)) as conn:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    m = re.search(r'^http_requests_total\{path="/hello"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


# --- the four measurements ----------------------------------------------------


def overhead(rounds: int, seconds: int) -> dict[str, Any]:
    """Instrumented vs uninstrumented /hello throughput, alternating runs."""
    runs: dict[str, list[dict[str, Any]]] = {"uninstrumented": [], "instrumented": []}
    with Server(instrumented=False) as bare, Server(instrumented=True) as instr:
        servers = {"uninstrumented": bare, "instrumented": instr}
        for server in servers.values():  # warm up: threads, caches, specialised bytecode
            wrk(server.url + "/hello", 50, 1)
        for r in range(rounds):
            # A B B A ...: drift in the machine's load hits both alike.
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                server = servers[name]
                cpu = server.cpu_seconds()
                result = wrk(server.url + "/hello", 50, seconds)
                result["cpu_us_per_request"] = (server.cpu_seconds() - cpu) / result["requests"] * 1e6
                runs[name].append(result)
    summary: dict[str, Any] = {"connections": 50, "seconds_per_run": seconds, "runs": runs}
    for name, rs in runs.items():
        summary[name] = {
            "rate": statistics.median(r["rate"] for r in rs),
            "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in rs),
            "transport_errors": sum(sum(r["transport_errors"].values()) for r in rs),
            "non_2xx": sum(r["non_2xx"] for r in rs),
        }
    # Each pair ran back to back, so its ratio shares the machine's load of
    # the moment; the median of those ratios shrugs off a disturbed pair.
    summary["pair_ratios"] = [
        i["rate"] / u["rate"] for i, u in zip(runs["instrumented"], runs["uninstrumented"], strict=True)
    ]
    summary["ratio"] = statistics.median(summary["pair_ratios"])
    summary["cpu_ratio"] = (
        summary["uninstrumented"]["cpu_us_per_request"] / summary["instrumented"]["cpu_us_per_request"]
    )
    return summary


def tutorial(connections: int, seconds: int, warmup: int) -> dict[str, Any]:
    """The tutorial's workload at a concurrency: the rate against the ideal."""
    ideal = connections / 0.5  # closed loop, 0.5 s mean delay
    with Server(max_delay=1.0, failure_rate=0.2) as server, Peak(server) as peak:
        # wrk's own rate includes the ramp-up (the first responses take up to
        # 1 s); the server's counter read after the warm-up gives the steady rate.
        box: dict[str, Any] = {}
        load = threading.Thread(target=lambda: box.update(wrk(server.url + "/hello", connections, seconds)))
        load.start()
        time.sleep(warmup)
        t0, n0 = time.monotonic(), requests_counted(server.url)
        time.sleep(seconds - warmup - 1)
        t1, n1 = time.monotonic(), requests_counted(server.url)
        load.join()
    result = box
    steady = (n1 - n0) / (t1 - t0)
    return {
        "connections": connections,
        "ideal": ideal,
        "wrk": result,
        "rate": steady,
        "ratio": steady / ideal,
        "wrk_ratio": result["rate"] / ideal,
        "transport_errors": sum(result["transport_errors"].values()),
        "failed_share": result["non_2xx"] / max(result["requests"], 1),
        "peak_rss_mib": peak.rss_kib / 1024,
        "peak_threads": peak.threads,
    }


def scrape(n: int) -> dict[str, Any]:
    """/metrics time and size, plain and gzip, on a server that has taken traffic."""
    out: dict[str, Any] = {}
    with Server(max_delay=0.0, failure_rate=0.2) as server:
        wrk(server.url + "/hello", 10, 1)
        with contextlib.closing(http.client.HTTPConnection(HOST, server.port, timeout=10)) as conn:
            for name, headers in (("plain", {}), ("gzip", {"Accept-Encoding": "gzip"})):
                times, size = [], 0
                for _ in range(n):
                    t = time.perf_counter()
                    conn.request("GET", "/metrics", headers=headers)
                    size = len(conn.getresponse().read())
                    times.append((time.perf_counter() - t) * 1e3)
                times.sort()
                out[name] = {
                    "median_ms": statistics.median(times),
                    "p99_ms": times[int(0.99 * (len(times) - 1))],
                    "bytes": size,
                }
    out["scrapes"] = n
    return out


def loadgen_vs_hey(connections: int, seconds: int) -> dict[str, Any]:
    """The project's load generator and hey, one after the other, same server and workload."""
    if not (TOOLS / "loadgen.py").exists():
        return {"error": "loadgen.py not available"}
    out: dict[str, Any] = {"connections": connections, "ideal": connections / 0.5}
    with Server(max_delay=1.0, failure_rate=0.2) as server:
        out["hey"] = hey(server.url + "/hello", connections, seconds)
        time.sleep(1)  # let hey's connections close
        out["loadgen"] = loadgen(server.url + "/hello", connections, seconds)
    out["ratio"] = out["loadgen"]["rate"] / out["hey"]["rate"]
    return out


# --- impolite clients ----------------------------------------------------------

REQUEST_HELLO = b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _settle(server: Server, descriptors: int, seconds: float = 5.0) -> None:
    """Wait until the server holds at least this many descriptors (it has accepted them)."""
    deadline = time.monotonic() + seconds
    while server.descriptors() < descriptors and time.monotonic() < deadline:
        time.sleep(0.02)


def _silent(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection((HOST, port), timeout=10) for _ in range(n)]


def _exchange(port: int, keep: bool = False) -> tuple[float, int, socket.socket | None]:
    """One /hello on a new connection: seconds to the whole response, its status, the socket if kept."""
    t = time.perf_counter()
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(REQUEST_HELLO)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
        re.search(rb"Content-Length: (\d+)", data).group(1)  # type: ignore[union-attr]
        if b"Content-Length" in data
        else 0
    ):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    took = time.perf_counter() - t
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    if keep and status == 200:
        return took, status, sock
    sock.close()
    return took, status, None


def _quantiles(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3,
        "max_ms": times[-1] * 1e3,
    }


def impolite(short: bool) -> dict[str, Any]:
    """What impolite clients cost the server under its default connection settings."""
    out: dict[str, Any] = {"held": []}
    with Server() as server:
        _exchange(server.port)  # the first connection starts the lobby, with descriptors of its own
        time.sleep(0.5)  # and closes
        base = server.descriptors()
        for n in (0, 1_000, 10_000):
            # Silent connections are closed at the 10 s header deadline: measure well before.
            socks = _silent(server.port, n)
            _settle(server, base + n)
            time.sleep(0.5)
            s = server.status()
            out["held"].append(
                {"kind": "silent", "connections": n, "rss_mib": s["VmRSS"] / 1024, "threads": s["Threads"]}
            )
            for sock in socks:
                sock.close()
            _settle_down(server, base)
        # Kept alive after a request: each holds a thread, up to the cap; past it, 503.
        n = 2_000 if short else 10_000
        kept, statuses = [], {}
        for _ in range(n):
            _, status, sock = _exchange(server.port, keep=True)
            statuses[status] = statuses.get(status, 0) + 1
            if sock is not None:
                kept.append(sock)
        time.sleep(0.5)
        s = server.status()
        out["held"].append(
            {"kind": "kept alive", "connections": n, "rss_mib": s["VmRSS"] / 1024, "threads": s["Threads"],
             "statuses": statuses}
        )  # fmt: skip
        for sock in kept:
            sock.close()
        _settle_down(server, base)
        out["peak_rss_mib"] = server.status()["VmHWM"] / 1024

    with Server() as server:
        silent = _silent(server.port, 5_000)
        trickling = _silent(server.port, 200)
        stop = threading.Event()

        def trickle() -> None:
            # One header byte a second each, as slowloris does.
            for byte in REQUEST_HELLO[:-4]:
                for sock in trickling:
                    with contextlib.suppress(OSError):
                        sock.send(bytes([byte]))
                if stop.wait(1.0):
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        time.sleep(1.5)
        times, statuses = [], {}
        for _ in range(50 if short else 200):
            took, status, _ = _exchange(server.port)
            times.append(took)
            statuses[status] = statuses.get(status, 0) + 1
        s = server.status()
        stop.set()
        sender.join()
        for sock in silent + trickling:
            sock.close()
        out["polite_beside"] = {
            "silent": 5_000, "slowloris": 200, "requests": len(times), "statuses": statuses,
            "rss_mib": s["VmRSS"] / 1024, "threads": s["Threads"], **_quantiles(times),
        }  # fmt: skip

    cap = 100
    with Server(True, 0.0, 0.0, "--max-connections", str(cap)) as server:
        kept = [_exchange(server.port, keep=True)[2] for _ in range(cap)]
        times, statuses = [], {}
        for _ in range(200 if short else 1_000):
            took, status, _ = _exchange(server.port)
            times.append(took)
            statuses[status] = statuses.get(status, 0) + 1
        for sock in kept:
            if sock is not None:
                sock.close()
        out["refusal"] = {"cap": cap, "requests": len(times), "statuses": statuses, **_quantiles(times)}
    return out


def _settle_down(server: Server, descriptors: int, seconds: float = 15.0) -> None:
    """Wait until the server is back to this many descriptors (it has closed the rest)."""
    deadline = time.monotonic() + seconds
    while server.descriptors() > descriptors and time.monotonic() < deadline:
        time.sleep(0.05)


# --- make profile -------------------------------------------------------------


def profile(seconds: int = 10) -> int:
    """Where the instrumented fast path spends the GIL: py-spy samples under wrk's load."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        print("bench: py-spy is not installed; `make profile` installs it", file=sys.stderr)
        return 2
    raw = ROOT / "build" / "profile.txt"
    raw.parent.mkdir(exist_ok=True)
    with Server() as server:
        load = threading.Thread(target=wrk, args=(server.url + "/hello", 50, seconds + 3))
        load.start()
        time.sleep(1)
        # --gil: only the thread holding the GIL, i.e. the one doing Python work.
        cmd = [py_spy, "record", "--pid", str(server.proc.pid), "--gil", "--rate", "100"]
        cmd += ["--duration", str(seconds), "--format", "raw", "--output", str(raw)]
        subprocess.run(cmd, capture_output=True, check=True, preexec_fn=_pin(LOAD_CORE))
        load.join()
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")" for f in stack.split(";")]
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    print(f"{total} samples of the GIL holder; raw stacks in {raw} (flamegraph.pl reads them)")
    for title, counts in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title}:")
        for frame, n in sorted(counts.items(), key=lambda kv: -kv[1])[:25]:
            print(f"  {n / total:6.1%}  {frame}")
    return 0


# --- python tools/bench.py instructions ----------------------------------------------

REQUEST = b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class _Pipelined:
    """A fake client socket: n pipelined /hello requests in, responses discarded."""

    def __init__(self, n: int) -> None:
        self.data = io.BytesIO(REQUEST * n)

    def makefile(self, mode: str, buffering: int = -1) -> io.BufferedIOBase:
        if "r" in mode:  # GuardedHandler closes this one and reads through recv_into
            return io.BufferedReader(io.BytesIO(self.data.getvalue()))
        return io.BufferedWriter(_Discard(), 64 * 1024)

    def recv_into(self, buffer: Any) -> int:
        return self.data.readinto(buffer)

    def send(self, data: Any) -> int:  # GuardedHandler writes through this
        return len(data)

    def setsockopt(self, *args: object) -> None:
        pass

    def settimeout(self, timeout: object) -> None:
        pass


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def drive(instrumented: bool, n: int) -> None:
    """Run n /hello requests through the handler in this process, no sockets."""
    from prometheus_client import CollectorRegistry

    import hello_server

    config = hello_server.Config(host=HOST, port=0, max_delay=0.0, failure_rate=0.0, access_log=False)
    server = hello_server.make_server(config, CollectorRegistry(), instrumented=instrumented)
    server.RequestHandlerClass(_Pipelined(50), (HOST, 1), server)  # warm up
    if n:
        server.RequestHandlerClass(_Pipelined(n), (HOST, 1), server)
    server.server_close()


def instructions(n: int = 1000) -> int:
    """CPU instructions per /hello request through the handler, counted by callgrind.

    Unlike requests/s on a shared machine, the count is the same from run to
    run (PYTHONHASHSEED pinned): the measure behind the changes in metrics.py.
    """
    if shutil.which("valgrind") is None:
        print("bench: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def count(variant: str, requests: int) -> int:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        cmd += [sys.executable, str(TOOLS / "bench.py"), "drive", variant, str(requests)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
        return int(re.search(r"Collected : (\d+)", done.stderr).group(1))  # type: ignore[union-attr]

    per = {v: (count(v, n) - count(v, 0)) / n for v in ("uninstrumented", "instrumented")}
    for variant, value in per.items():
        print(f"{variant:16} {value:>9,.0f} instructions per request")
    extra = per["instrumented"] - per["uninstrumented"]
    share, ratio = extra / per["uninstrumented"], per["uninstrumented"] / per["instrumented"]
    print(f"instrumentation  {extra:>9,.0f} (+{share:.1%}); uninstrumented / instrumented {ratio:.3f}")
    return 0


# --- report -------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "pinned": f"server on core {SERVER_CORE}, load on core {LOAD_CORE}" if PINNED else "no (fewer than 2 cores)",
        "load_average_before": os.getloadavg(),
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        ("instrumented / uninstrumented throughput", f">= {TARGET_OVERHEAD}", r["overhead"]["ratio"],
         r["overhead"]["ratio"] >= TARGET_OVERHEAD),
    ]  # fmt: skip
    big = max(r["tutorial"], key=lambda t: t["connections"])
    rows.append(
        (f"tutorial workload at {big['connections']} connections / ideal", f">= {TARGET_TUTORIAL}, 0 errors",
         big["ratio"], big["ratio"] >= TARGET_TUTORIAL and big["transport_errors"] == 0)
    )  # fmt: skip
    median = r["scrape"]["plain"]["median_ms"]
    rows.append(("/metrics scrape median, ms", f"<= {TARGET_SCRAPE_MS}", median, median <= TARGET_SCRAPE_MS))
    if "impolite" in r:
        peak = r["impolite"]["peak_rss_mib"]
        rows.append((f"peak RSS, {max(h['connections'] for h in r['impolite']['held']):,} connections held, MiB",
                     f"< {TARGET_RSS_MIB}", peak, peak < TARGET_RSS_MIB))  # fmt: skip
    lg = r["loadgen_vs_hey"]
    if "ratio" in lg:
        rows.append(("loadgen rate / hey rate", f">= {TARGET_LOADGEN}", lg["ratio"], lg["ratio"] >= TARGET_LOADGEN))
    else:
        rows.append(("loadgen rate / hey rate", f">= {TARGET_LOADGEN}", None, None))
    return [{"target": name, "wanted": wanted, "measured": value, "met": met} for name, wanted, value, met in rows]


def table(r: dict[str, Any]) -> str:
    m, o, s, lg = r["machine"], r["overhead"], r["scrape"], r["loadgen_vs_hey"]
    lines = [
        f"machine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}; pinned: {m['pinned']}",
        # Other work on the machine moves every rate; the load average says how much there was.
        f"load average (1 min) {m['load_average_before'][0]:.1f} before the run, "
        f"{m['load_average_after'][0]:.1f} after (which counts this bench's own threads too)",
        "",
        f"1. overhead: /hello, no delay, {o['connections']} keep-alive connections (wrk), "
        f"{len(o['runs']['instrumented'])} alternating runs of {o['seconds_per_run']} s each",
        f"   {'':16} {'req/s (median)':>15} {'CPU µs/req':>11} {'errors':>7}",
    ]
    for name in ("uninstrumented", "instrumented"):
        v = o[name]
        lines.append(f"   {name:16} {v['rate']:>15,.0f} {v['cpu_us_per_request']:>11.1f} {v['transport_errors']:>7}")
    pairs = " ".join(f"{x:.2f}" for x in o["pair_ratios"])
    lines += [
        f"   ratio {o['ratio']:.3f}: the median of the pairs' ratios ({pairs})",
        f"   CPU per request, uninstrumented / instrumented: {o['cpu_ratio']:.3f}",
        "",
    ]
    lines.append("2. tutorial workload: delay 0-1 s, 20% failures (wrk)")
    lines.append(
        f"   {'connections':>11} {'ideal':>6} {'req/s':>7} {'ratio':>6} {'wrk whole run':>14}"
        f" {'errors':>7} {'500s':>5} {'peak RSS':>9} {'threads':>8}"
    )
    for t in r["tutorial"]:
        lines.append(
            f"   {t['connections']:>11,} {t['ideal']:>6,.0f} {t['rate']:>7,.0f} {t['ratio']:>6.3f}"
            f" {t['wrk']['rate']:>8,.0f} ({t['wrk_ratio']:.3f})"
            f" {t['transport_errors']:>5} {t['failed_share']:>5.0%}"
            f" {t['peak_rss_mib']:>6.0f} MiB {t['peak_threads']:>8,}"
        )
    lines += ["   (req/s: the server's own count after the warm-up; wrk whole run: including the ramp-up)", ""]
    lines.append(f"3. /metrics scrape, {s['scrapes']} in a row on one connection")
    for name in ("plain", "gzip"):
        v = s[name]
        lines.append(f"   {name:6} median {v['median_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms, {v['bytes']:,} bytes")
    lines.append("")
    if "error" in lg:
        lines += [f"4. load generator vs hey: {lg['error']}", ""]
    else:
        lines.append(f"4. load generator vs hey: tutorial workload, {lg['connections']} connections, closed loop")
        for name in ("hey", "loadgen"):
            v = lg[name]
            lines.append(f"   {name:8} {v['rate']:>7,.0f} req/s of {lg['ideal']:,.0f} ideal, {v['errors']} errors")
        lines += [f"   ratio loadgen / hey {lg['ratio']:.3f}", ""]
    im = r.get("impolite")
    if im:
        lines.append("5. impolite clients, default connection settings (header 10 s, idle 75 s, cap 4,096)")
        lines.append(f"   {'held':>10} {'connections':>12} {'RSS':>9} {'threads':>8}")
        for h in im["held"]:
            lines.append(f"   {h['kind']:>10} {h['connections']:>12,} {h['rss_mib']:>5.0f} MiB {h['threads']:>8,}")
        lines.append(f"   peak RSS over those: {im['peak_rss_mib']:.0f} MiB")
        pb = im["polite_beside"]
        lines.append(
            f"   polite /hello beside {pb['silent']:,} silent + {pb['slowloris']} slowloris connections: "
            f"median {pb['median_ms']:.2f} ms, p99 {pb['p99_ms']:.2f} ms, max {pb['max_ms']:.2f} ms, "
            f"statuses {pb['statuses']}, {pb['threads']:,} threads, {pb['rss_mib']:.0f} MiB"
        )
        rf = im["refusal"]
        lines += [
            f"   refusal past a cap of {rf['cap']}: median {rf['median_ms']:.2f} ms, p99 {rf['p99_ms']:.2f} ms "
            f"(connect to the end of the 503), statuses {rf['statuses']}",
            "",
        ]
    lines.append("targets:")
    for t in r["targets"]:
        value = "n/a" if t["measured"] is None else f"{t['measured']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"   {t['target']:48} {t['wanted']:>16} {value:>8}  {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve-uninstrumented"]:
        return serve_uninstrumented(argv[1:])
    if argv[:1] == ["profile"]:
        return profile()
    if argv[:1] == ["instructions"]:
        return instructions()
    if argv[:1] == ["drive"]:
        drive(argv[1] == "instrumented", int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--json", default=str(ROOT / "build" / "bench.json"), help="where to write the numbers")
    parser.add_argument("--quick", action="store_true", help="short runs: checks that the bench works, not numbers")
    args = parser.parse_args(argv)
    for tool in ("wrk", "hey"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed; `make bench-tools` installs it")
    # 2,000 connections need 2,000 descriptors in wrk and in the server.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))

    if PINNED:
        # This process (and the load tools it starts) stays off the server's core.
        os.sched_setaffinity(0, {LOAD_CORE})
    short = args.quick
    started = time.monotonic()
    r: dict[str, Any] = {"machine": machine()}

    def step(what: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {what}", file=sys.stderr, flush=True)

    step("1. overhead")
    r["overhead"] = overhead(rounds=2 if short else 10, seconds=1 if short else 3)
    r["tutorial"] = []
    for connections in (500, 2000):
        step(f"2. tutorial workload, {connections} connections")
        r["tutorial"].append(tutorial(connections, seconds=5 if short else 20, warmup=2 if short else 4))
    step("3. scrape")
    r["scrape"] = scrape(n=50 if short else 300)
    step("4. load generator vs hey")
    r["loadgen_vs_hey"] = loadgen_vs_hey(500, seconds=3 if short else 10)
    step("5. impolite clients")
    r["impolite"] = impolite(short)
    r["targets"] = targets(r)
    r["seconds"] = time.monotonic() - started
    r["machine"]["load_average_after"] = os.getloadavg()
    print(table(r))
    print(f"\n{r['seconds']:.0f} s; numbers in {args.json}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
