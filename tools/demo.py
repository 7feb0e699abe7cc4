"""The whole tutorial in one command (``make demo``).

Starts the app and a real Prometheus on loopback (stack.py, prometheus.yml's
own intervals), sends a minute of traffic with loadgen.py, prints the example
queries' results, draws the report PNG, prints the audit's verdict (the
server's counters, directly and through Prometheus, against what the client
saw), and stops both. Exit status 1 if the audit finds a mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import audit
import promapi
import queries
import report
import stack
import traffic


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="App + Prometheus + a minute of traffic + queries + report + audit.")
    # The tutorial's workload: 1,000 req/s against the 0-1 s delay, ~500 in flight.
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("build/demo"), help="where the PNG and JSON go")
    args = parser.parse_args(argv)
    if not (args.rate > 0 and args.duration > 0):
        parser.error("--rate and --duration must be positive")

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        with stack.native_stack(app_args=["--access-log", "off"]) as s:
            say(f"demo: app at {s.app_url}, Prometheus at {s.prometheus_url} (scrape interval from prometheus.yml)")
            say("demo: waiting for Prometheus' first scrape")
            s.wait_for_scrape()
            plan = traffic.Plan(traffic.Target.parse(s.app_url + "/hello"), rate=args.rate, duration=args.duration)
            stats, result = audit.audited_run(
                plan,
                traffic.Progress(sys.stderr),
                prometheus_url=s.prometheus_url,
                log=lambda m: print(m, file=sys.stderr, flush=True),
            )
            say("")
            say(traffic.format_summary(stats.summary()))
            say("")
            say(f"demo: the example queries (queries.py) at {time.strftime('%H:%M:%S', time.gmtime())} UTC")
            say(queries.format_table(queries.run_all(s.prometheus_url)))
            png = report.render(s.prometheus_url, stats.started_wall - 20, time.time(), args.output / "report.png")
            say("")
            say(f"demo: report written to {png}")
            say("")
            say(audit.format_audit(result))
    except (stack.StackError, promapi.PrometheusError, traffic.UsageError, TimeoutError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C reaches only this process (the stack runs in sessions of its
        # own); leaving native_stack has already stopped the app and Prometheus.
        print("\ndemo: interrupted; app and Prometheus stopped", file=sys.stderr)
        return 130
    say("demo: app and Prometheus stopped")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
