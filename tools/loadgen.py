"""Mock traffic for the hello server, and an audit of its metrics against it.

``python tools/loadgen.py [URL ...] --rate R | --concurrency N`` drives a URL
(default http://127.0.0.1:8080/hello; several URLs of replicas share the
traffic round robin) for ``--duration`` seconds or
``--requests`` requests, shows a live progress line on stderr, and prints a
summary (``--json FILE`` writes it too). The engine is traffic.py.

``--audit`` scrapes the server's /metrics before and after the run and checks
that the server counted exactly what this client saw; with ``--prometheus
URL`` it checks the same through Prometheus after its next scrape (audit.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from audit import audited_run, format_audit
from traffic import DEFAULT_URL, Plan, Progress, Target, UsageError, check_reachable, format_summary, run

# --- the command line -------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, no usage block: the --help has that.
        raise UsageError(f"{message} (see --help)")


def _positive(kind: Callable[[str], float | int]) -> Callable[[str], Any]:
    def parse(text: str) -> float | int:
        value = kind(text)
        if not value > 0 or math.isinf(value):
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def parse_args(argv: Sequence[str] | None) -> tuple[Plan, argparse.Namespace]:
    p = _Parser(
        prog="loadgen",
        description="Mock traffic for the hello server, with an audit of its metrics.",
        epilog="Exit status: 0 done, 1 the audit found a count mismatch or could not finish, "
        "2 bad arguments or unreachable target, 130 aborted by a second Ctrl-C.",
    )
    p.add_argument(
        "urls",
        nargs="*",
        metavar="URL",
        default=[DEFAULT_URL],
        help=f"target URL (default: {DEFAULT_URL}); several URLs (replicas of one service) share it round robin",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rate", type=_positive(float), help="open loop: requests per second on a fixed schedule")
    how.add_argument("--concurrency", type=_positive(int), help="closed loop: this many connections, back to back")
    p.add_argument("--duration", type=_positive(float), help="seconds to run (default 10 unless --requests)")
    p.add_argument("--requests", type=_positive(int), help="number of requests to send")
    p.add_argument("--timeout", type=_positive(float), default=10.0, help="per-request timeout, s (default 10)")
    p.add_argument("--method", choices=("GET", "HEAD"), default="GET")
    p.add_argument(
        "--json", metavar="FILE", help="write the summary (and audit) as JSON; - for stdout (the table goes to stderr)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--progress-interval", type=_positive(float), help="seconds between progress lines")
    p.add_argument("--audit", action="store_true", help="check the server's metrics against what the client saw")
    p.add_argument("--metrics-url", help="where the audit scrapes (default: /metrics on the target's server)")
    p.add_argument("--prometheus", metavar="URL", help="with --audit: also check through this Prometheus")
    p.add_argument(
        "--job",
        help="with --prometheus: sum over every target of this job instead of the targets whose address "
        "is the URL's (needed where Prometheus scrapes other addresses, as behind Docker's published ports)",
    )
    p.add_argument(
        "--scrape-timeout", type=_positive(float), default=60.0, help="longest wait for a Prometheus scrape, s"
    )
    args = p.parse_args(argv)
    if args.prometheus and not args.audit:
        raise UsageError("--prometheus needs --audit")
    if args.job and not args.prometheus:
        raise UsageError("--job needs --prometheus")
    if args.rate is None and args.concurrency is None:
        args.rate = 10.0
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    target, *replicas = (Target.parse(url) for url in args.urls)
    if any(r.request_target != target.request_target for r in replicas):
        raise UsageError("several URLs must have the same path: they are replicas of one service")
    for url in filter(None, (args.metrics_url, args.prometheus)):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"malformed URL {url!r}")
    if args.json and args.json != "-":
        _check_writable(args.json)
    plan = Plan(
        target, args.rate, args.concurrency, args.duration, args.requests, args.timeout, args.method, tuple(replicas)
    )
    return plan, args


def _check_writable(path: str) -> None:
    """Refuse a --json path that could not be written, before any traffic is sent."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise UsageError(f"--json {path}: is a directory; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"--json {path}: no directory {folder!r}; create it or choose another path")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise UsageError(f"--json {path}: not writable; choose another path")


def _same_terminal(a: TextIO, b: TextIO) -> bool:
    """Whether a and b are one terminal, so what goes to one shows in the other."""
    try:
        return a.isatty() and b.isatty() and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    try:
        plan, args = parse_args(argv)
        for target in plan.targets:
            check_reachable(target)
    except UsageError as e:
        print(f"loadgen: error: {e}", file=sys.stderr)
        return 2
    progress = None if args.quiet else Progress(sys.stderr, args.progress_interval)
    # What is about to run goes to stderr; the summary on stdout starts with
    # the same line, so that a saved summary says what it measured. On one
    # terminal the reader has seen it already.
    header_shown = _same_terminal(sys.stdout, sys.stderr)
    print(f"loadgen: {plan.describe()}", file=sys.stderr, flush=True)
    audit = None
    try:
        if args.audit:
            stats, audit = audited_run(
                plan,
                progress,
                args.metrics_url,
                args.prometheus,
                args.scrape_timeout,
                log=lambda m: print(m, file=sys.stderr, flush=True),
                interruptible=True,
                job=args.job,
            )
        else:
            stats = run(plan, progress, interruptible=True)
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"loadgen: error: {e}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError, RuntimeError, ValueError) as e:
        print(f"loadgen: audit failed: {e}", file=sys.stderr)
        return 1
    summary = stats.summary()
    # With --json -, stdout carries only the JSON.
    table = sys.stderr if args.json == "-" else sys.stdout
    print(format_summary(summary, header=not (header_shown and table is sys.stdout)), file=table)
    if audit is not None:
        summary["audit"] = audit.as_dict()
        print(file=table)
        print(format_audit(audit), file=table)
    if args.json:
        text = json.dumps(_finite(summary), indent=2, allow_nan=False)
        if args.json == "-":
            print(text)
        else:
            try:
                with open(args.json, "w") as f:
                    f.write(text + "\n")
            except OSError as e:
                print(f"loadgen: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
                return 1
    return 1 if audit is not None and not audit.ok else 0


def _finite(o: Any) -> Any:
    """o with NaN and infinities as null: JSON has neither."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


if __name__ == "__main__":
    # Make a broken pipe (loadgen ... | head) quiet.
    try:
        sys.exit(main())
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
