"""alertmanager/alertmanager.yml and its checks, offline: amtool, no Alertmanager running.

The routes checker must fail naming an alert without a case and a case that
routes elsewhere; the commented receiver examples must be a valid
configuration once uncommented; the loopback version stack.py derives must
point at the receiver and keep every route's structure.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import alert_receiver
import stack
from alertmanager import check_routes
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "alertmanager" / "alertmanager.yml"
# A commented-out line of YAML (`#   - key: value`, `#     key: value`), as
# opposed to prose, which starts with a capital letter or has no `key:`.
COMMENTED_YAML = re.compile(r"^(\s*)# ( *(?:- )?[a-z_]+:(?: .*)?)$")


def run_checker(*args: str) -> subprocess.CompletedProcess[str]:
    require_tool("amtool")
    return subprocess.run(
        [sys.executable, str(ROOT / "alertmanager" / "check_routes.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def amtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("amtool"), "check-config", str(path)], capture_output=True, text=True, timeout=30
    )


def uncommented(text: str) -> str:
    """The configuration with every commented-out receiver example switched on."""
    head, receivers = text.split("\nreceivers:\n")
    lines = [COMMENTED_YAML.sub(r"\1\2", line) for line in receivers.splitlines()]
    return head + "\nreceivers:\n" + "\n".join(lines) + "\n"


def test_every_alert_routes_where_its_case_says():
    result = run_checker()
    assert result.returncode == 0, result.stderr
    assert f"every alert of {len(check_routes.alert_labels())} has one" in result.stdout


def test_an_alert_without_a_case_fails_by_name(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in (ROOT / "rules").glob("*.yml"):
        (rules / path.name).write_text(path.read_text())
    new = {"alert": "HelloSomethingNew", "expr": "vector(1)", "labels": {"severity": "page"}}
    (rules / "new.yml").write_text(yaml.safe_dump({"groups": [{"name": "new", "rules": [new]}]}))
    result = run_checker("--rules", str(rules))
    assert result.returncode == 1
    assert "alerts with no routing case: HelloSomethingNew;" in result.stderr


def test_a_case_routed_elsewhere_fails_saying_where(tmp_path):
    cases = yaml.safe_load((ROOT / "alertmanager" / "routes.test.yml").read_text())
    [target_down] = [case for case in cases["cases"] if case.get("alert") == "HelloTargetDown"]
    target_down["receivers"] = ["ticket"]
    path = tmp_path / "cases.yml"
    path.write_text(yaml.safe_dump(cases))
    result = run_checker("--cases", str(path))
    assert result.returncode == 1
    assert (
        "alertname=HelloTargetDown instance=app:8080 job=hello severity=page: expected ticket, routed to page"
        in result.stderr
    )


def test_the_route_cases_load_with_each_rules_labels():
    alerts = check_routes.alert_labels()
    cases = check_routes.load_cases(check_routes.CASES, alerts)
    burn = next(case for case in cases if case.alert == "HelloErrorBudgetBurnFast")
    assert burn.labels == {
        "alertname": "HelloErrorBudgetBurnFast",
        "severity": "page",
        "slo": "availability-75",
        "job": "hello",
    }
    assert check_routes.coverage(alerts, cases) == []


def test_the_commented_receiver_examples_are_valid_once_uncommented(tmp_path):
    text = uncommented(CONFIG.read_text())
    receivers = {r["name"]: r for r in yaml.safe_load(text)["receivers"]}
    # The transformation switched on exactly the examples, where they belong.
    assert set(receivers["page"]) == {"name", "webhook_configs", "pagerduty_configs"}
    assert set(receivers["ticket"]) == {"name", "webhook_configs", "slack_configs", "email_configs"}
    path = tmp_path / "alertmanager.yml"
    path.write_text(text)
    result = amtool_check(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_secret_is_written_inline():
    # Secrets come from mounted files (*_file), even in the commented examples.
    text = uncommented(CONFIG.read_text())
    inline = re.findall(r"^\s*(?:- )?(routing_key|service_key|api_url|auth_password|auth_secret):", text, re.M)
    assert inline == []
    assert "routing_key_file" in text and "api_url_file" in text and "auth_password_file" in text


def test_the_loopback_version_points_at_the_receiver_and_scales_every_route(tmp_path):
    timings = {"group_wait": "1s", "group_interval": "1s", "repeat_interval": "2s"}
    text = stack.render_alertmanager_config("127.0.0.1:5555", timings=timings)
    config = yaml.safe_load(text)
    urls = [hook["url"] for r in config["receivers"] for hook in r.get("webhook_configs", [])]
    assert urls == ["http://127.0.0.1:5555/"] * 3
    routes = [config["route"], *config["route"]["routes"]]
    assert [{k: route[k] for k in timings} for route in routes] == [timings] * 4
    # Only those changed: the rest is the file as compose mounts it.
    original = yaml.safe_load(CONFIG.read_text())
    assert config["inhibit_rules"] == original["inhibit_rules"]
    assert [r.get("matchers") for r in routes[1:]] == [r.get("matchers") for r in original["route"]["routes"]]
    path = tmp_path / "alertmanager.yml"
    path.write_text(text)
    assert amtool_check(path).returncode == 0


def test_a_config_without_the_receiver_it_rewrites_is_refused(tmp_path):
    # A webhook moved to another host:port would leave the loopback stack's
    # Alertmanager posting to a name that does not resolve: say so instead.
    moved = tmp_path / "alertmanager.yml"
    moved.write_text(CONFIG.read_text().replace(stack.RECEIVER, "receiver.example:5001"))
    with pytest.raises(stack.StackError, match="no webhook at alert-receiver:5001"):
        stack.render_alertmanager_config("127.0.0.1:5555", source=moved)


@pytest.mark.parametrize(("alertmanagers", "expected"), [(["127.0.0.1:9999"], ["127.0.0.1:9999"]), ([], None)])
def test_prometheus_sends_alerts_to_the_alertmanager_it_is_given(alertmanagers, expected):
    targets = {"hello": "127.0.0.1:1", "prometheus": "127.0.0.1:2"}
    config = yaml.safe_load(stack.render_config(targets, alertmanagers=alertmanagers))
    if expected is None:
        assert "alerting" not in config
    else:
        assert config["alerting"]["alertmanagers"] == [{"static_configs": [{"targets": expected}]}]
    # As compose runs it: the alertmanager service.
    compose = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    assert compose["alerting"]["alertmanagers"] == [{"static_configs": [{"targets": ["alertmanager:9093"]}]}]


def test_compose_wires_prometheus_alertmanager_and_the_receiver_together():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    alertmanager, receiver = compose["alertmanager"], compose["alert-receiver"]
    # Prometheus' target and the webhook URLs name services that exist, on their ports.
    [target] = yaml.safe_load((ROOT / "prometheus.yml").read_text())["alerting"]["alertmanagers"][0]["static_configs"]
    assert target["targets"] == ["alertmanager:9093"]
    assert alertmanager["ports"] == ["127.0.0.1:${ALERTMANAGER_PORT:-9093}:9093"]
    host, port = stack.RECEIVER.split(":")
    assert host in compose and int(port) == alert_receiver.Config().port
    assert receiver["environment"]["HELLO_RECEIVER_HOST"] == "0.0.0.0"
    assert "./tools/alert_receiver.py:/receiver/alert_receiver.py:ro" in receiver["volumes"]
    # Alertmanager reads the repository's file, and keeps silences in a volume.
    assert "./alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in alertmanager["volumes"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    assert "alertmanager-data:/alertmanager" in alertmanager["volumes"]
    assert "--storage.path=/alertmanager" in alertmanager["command"]
    assert compose["prometheus"]["depends_on"]["alertmanager"] == {"condition": "service_healthy"}
