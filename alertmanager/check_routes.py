"""Check where every alert of rules/ is routed (make lint).

Reads the alerts of rules/*.yml and the cases of alertmanager/routes.test.yml,
fails naming every alert without a case (and every case for an alert that no
longer exists), then asks amtool, for each case, which receivers the
Alertmanager configuration sends those labels to:

    python alertmanager/check_routes.py

Exit status 0 when every case routes as written, 1 when one does not or an
alert has no case, 2 when a file or amtool is missing or malformed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "alertmanager" / "alertmanager.yml"
CASES = ROOT / "alertmanager" / "routes.test.yml"
RULES = ROOT / "rules"


class CheckError(Exception):
    """A missing or malformed input: one line, exit status 2."""


@dataclass(frozen=True)
class Case:
    labels: dict[str, str]
    receivers: tuple[str, ...]
    alert: str | None  # the rule it stands for, if any

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.labels.items()))


def alert_labels(rules_dir: Path = RULES) -> dict[str, dict[str, str]]:
    """Each alert of rules_dir/*.yml with the labels its rule sets, alertname included."""
    alerts: dict[str, dict[str, str]] = {}
    for path in sorted(rules_dir.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = {"alertname": rule["alert"], **rule.get("labels", {})}
    return alerts


def load_cases(path: Path, alerts: Mapping[str, Mapping[str, str]]) -> list[Case]:
    try:
        entries = yaml.safe_load(path.read_text())["cases"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise CheckError(f"cannot read the cases in {path}: {e}") from e
    cases = []
    for entry in entries:
        name = entry.get("alert")
        rule = alerts.get(name, {"alertname": name} if name else {})
        labels = {**rule, **{k: str(v) for k, v in entry.get("labels", {}).items()}}
        if "alertname" not in labels and name is None:
            raise CheckError(f"{path}: a case needs `alert:` or an alertname in `labels:`: {entry}")
        if not entry.get("receivers"):
            raise CheckError(f"{path}: the case for {name or labels['alertname']} names no receivers")
        cases.append(Case(labels, tuple(entry["receivers"]), name))
    return cases


def coverage(alerts: Mapping[str, Any], cases: Sequence[Case]) -> list[str]:
    """Problems with which alerts the cases cover; empty when each alert has a case."""
    covered = {case.alert for case in cases if case.alert}
    problems = []
    if missing := sorted(set(alerts) - covered):
        problems.append(f"alerts with no routing case: {', '.join(missing)}; add each to the cases with its receivers")
    if stale := sorted(covered - set(alerts)):
        problems.append(f"cases for alerts that are not in rules/: {', '.join(stale)}")
    return problems


def routed(amtool: str, config: Path, case: Case) -> str | None:
    """None if amtool routes case's labels to exactly its receivers, else what it said."""
    result = subprocess.run(
        [
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={config}",
            f"--verify.receivers={','.join(case.receivers)}",
            *(f"{k}={v}" for k, v in sorted(case.labels.items())),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode == 0:
        return None
    got = result.stdout.strip().splitlines()[:1] or [result.stderr.strip()]
    return f"{case.describe()}: expected {','.join(case.receivers)}, routed to {got[0]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="Alertmanager configuration (default %(default)s)")
    parser.add_argument("--cases", type=Path, default=CASES, help="default %(default)s")
    parser.add_argument("--rules", type=Path, default=RULES, help="directory of rule files (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        amtool = shutil.which("amtool")
        if amtool is None:
            raise CheckError("amtool is not installed: `make tools` installs Debian's prometheus-alertmanager")
        alerts = alert_labels(args.rules)
        if not alerts:
            raise CheckError(f"no alerts found in {args.rules}/*.yml")
        cases = load_cases(args.cases, alerts)
    except CheckError as e:
        print(f"check_routes: {e}", file=sys.stderr)
        return 2
    problems = coverage(alerts, cases)
    problems += [p for case in cases if (p := routed(amtool, args.config, case))]
    for problem in problems:
        print(f"check_routes: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_routes: {len(cases)} cases route as expected; every alert of {len(alerts)} has one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
