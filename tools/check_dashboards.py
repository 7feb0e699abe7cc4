"""Offline checks of the Grafana dashboards in grafana/dashboards/ (make lint).

No Grafana server installs here and Grafana's own libraries do not validate,
so this checks what would break silently in a browser: every PromQL
expression parses (``promql-parser``, after Grafana's macros such as
``$__rate_interval`` are replaced by durations), every panel points at the
provisioned datasource, panel ids are unique and the grid fits 24 columns.
The end-to-end tests (test_stack.py) also run every expression against a
real Prometheus, through ``expressions()`` and ``promql()`` here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources"

#: Grafana's global variables as a query with a 15-minute range would see
#: them. Longer names first: $__interval_ms must not become 15s_ms.
MACROS = {
    "$__rate_interval_ms": "60000",
    "$__rate_interval": "1m",
    "$__interval_ms": "15000",
    "$__interval": "15s",
    "$__range_ms": "900000",
    "$__range_s": "900",
    "$__range": "15m",
}


def promql(expr: str) -> str:
    """expr with Grafana's macros (``$__x`` and ``${__x}``) replaced by plain values."""
    for name, value in MACROS.items():
        expr = expr.replace("${" + name[1:] + "}", value).replace(name, value)
    return expr


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL as Grafana sends it) for every query in the dashboard."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('title')!r} query {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query" and isinstance(query, dict) and query.get("query"):
            found.append((f"variable {variable.get('name')!r}", query["query"]))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (by name or by an exact __name__ matcher)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
                    names.add(matcher.value)

    promql_parser.walk(promql_parser.parse(promql(expr)), visit)
    return names


def provisioned_datasource_uids() -> set[str]:
    uids = set()
    for path in DATASOURCES.glob("*.yml"):
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            uids.add(source.get("uid"))
    return uids


def problems(dashboard: dict[str, Any], datasource_uids: set[str]) -> list[str]:
    """What is wrong with one dashboard; empty if nothing."""
    found = []
    for key in ("uid", "title", "panels"):
        if not dashboard.get(key):
            found.append(f"no {key}")
    ids: set[int] = set()
    for panel in panels(dashboard):
        where = f"panel {panel.get('title')!r}"
        if panel.get("id") in ids:
            found.append(f"{where}: id {panel.get('id')} is used twice")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if grid.get("x", 0) + grid.get("w", 0) > 24:
            found.append(f"{where}: wider than the 24-column grid")
        if panel.get("type") != "row":
            sources = [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
            for source in sources:
                if not isinstance(source, dict) or source.get("uid") not in datasource_uids:
                    found.append(f"{where}: datasource {source!r} is not a provisioned one {sorted(datasource_uids)}")
            if not panel.get("targets"):
                found.append(f"{where}: no query")
    for where, expr in expressions(dashboard):
        text = promql(expr)
        if "$" in text:
            found.append(f"{where}: unknown Grafana variable left in {text!r}")
            continue
        try:
            promql_parser.parse(text)
        except ValueError as e:
            found.append(f"{where}: PromQL does not parse ({e}): {text!r}")
    return found


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in argv] if argv else sorted(DASHBOARDS.glob("*.json"))
    if not paths:
        print(f"check_dashboards: no dashboards in {DASHBOARDS}", file=sys.stderr)
        return 1
    uids = provisioned_datasource_uids()
    failed = False
    for path in paths:
        try:
            dashboard = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            failed = True
            continue
        found = problems(dashboard, uids)
        for problem in found:
            print(f"{path}: {problem}", file=sys.stderr)
        failed |= bool(found)
        if not found:
            print(f"{path}: {len(expressions(dashboard))} queries parse")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
