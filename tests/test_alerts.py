"""End to end: Prometheus → Alertmanager → the webhook receiver (stack.native_stack).

Real Prometheus and Alertmanager (Debian's packages) on loopback prove that
alerts reach someone: Watchdog arrives at its receiver; with every request
failing, the error-budget page arrives with its labels and summary while the
5xx-ratio warning and the slow-burn ticket it implies are inhibited; with the
app stopped, HelloTargetDown arrives and silences the alerts that follow from
it. The shipped rules and routes are used as they are, with two changes made
for the test's sake: every `for` runs in seconds instead of minutes (rules/
copied with each duration divided by 60, so the order in which alerts fire is
the same; HelloTargetDown's stays longer than Prometheus' start-up), and every
route waits and repeats within seconds. Every wait is on
a condition with a deadline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_stack import Traffic

import stack
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
RULES = {
    rule["alert"]: rule
    for path in sorted((ROOT / "rules").glob("*.yml"))
    for group in yaml.safe_load(path.read_text())["groups"]
    for rule in group["rules"]
    if "alert" in rule
}
# Every /hello fails; one request in ten goes to an unknown path (a 404), so
# the error ratio is about 0.9: over the fast burn's 75% and the warning's 35%.
APP_ARGS = ["--access-log", "off", "--max-delay", "0.01", "--failure-rate", "1"]
# Alertmanager's waits, for every route: a repeat every ~2 s shows within
# seconds whether an alert is being notified or held back.
TIMINGS = {"group_wait": "1s", "group_interval": "1s", "repeat_interval": "2s"}
TIMEOUT = 60.0
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# up{job="hello"} is absent until the first scrape, about 5 s after start
# (target discovery), and absent() makes HelloTargetDown true meanwhile: the
# shipped 1m covers that, a scaled 1 s would not.
FOR_AT_LEAST = {"HelloTargetDown": 15}
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def scaled_rules(directory: Path) -> Path:
    """rules/*.yml in directory with each alert's `for` divided by 60 (1m → 1s), within FOR_AT_LEAST."""
    directory.mkdir()
    for path in sorted((ROOT / "rules").glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    seconds = sum(int(n) * SECONDS[unit] for n, unit in re.findall(r"(\d+)([smhd])", rule["for"]))
                    rule["for"] = f"{max(1, seconds // 60, FOR_AT_LEAST.get(rule['alert'], 0))}s"
        (directory / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return directory


@contextmanager
def alerting_stack(workdir: Path) -> Iterator[stack.Stack]:
    require_tool("prometheus")
    require_tool("prometheus-alertmanager")
    with stack.native_stack(
        app_args=APP_ARGS,
        scrape_interval="1s",
        evaluation_interval="1s",
        # Alerts evaluated before Prometheus has discovered Alertmanager are
        # dropped until the next resend (1m by default).
        alert_resend_delay="1s",
        alerting=True,
        alertmanager_timings=TIMINGS,
        rules_dir=scaled_rules(workdir / "rules"),
    ) as running:
        yield running


def notifications(running: stack.Stack) -> list[dict[str, str]]:
    """The receiver's lines so far, each as a dict of its logfmt fields."""
    assert running.alerting is not None
    return [
        {key: json.loads(value) if value.startswith('"') else value for key, value in LOGFMT.findall(line)}
        for line in running.alerting.lines()
    ]


def arrived(running: stack.Stack, alertname: str, count: int = 1) -> list[dict[str, str]]:
    """Wait until the receiver has written count lines about alertname; all of them."""

    def lines() -> list[dict[str, str]]:
        found = [n for n in notifications(running) if n["alertname"] == alertname]
        return found if len(found) >= count else []

    return stack.wait_until(lines, TIMEOUT, f"{count} notification(s) of {alertname}", interval=0.2)


def without_ts(notification: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in notification.items() if k != "ts"}


def alertmanager_alerts(running: stack.Stack) -> dict[str, dict[str, Any]]:
    assert running.alerting is not None
    return {alert["labels"]["alertname"]: alert for alert in running.alerting.alerts()}


def inhibited(running: stack.Stack, by: str, *names: str) -> dict[str, dict[str, Any]]:
    """Wait until Alertmanager holds every alert of names, each inhibited by the alert named by."""

    def held() -> dict[str, dict[str, Any]] | None:
        alerts = alertmanager_alerts(running)
        if by not in alerts or not all(name in alerts for name in names):
            return None
        source = alerts[by]["fingerprint"]
        ok = all(
            alerts[n]["status"]["state"] == "suppressed" and source in alerts[n]["status"]["inhibitedBy"] for n in names
        )
        return alerts if ok else None

    return stack.wait_until(held, TIMEOUT, f"{', '.join(names)} inhibited by {by}", interval=0.2)


@pytest.fixture(scope="module")
def failing(tmp_path_factory) -> Iterator[stack.Stack]:
    """The stack with every /hello failing and traffic flowing throughout."""
    with alerting_stack(tmp_path_factory.mktemp("alerts")) as running, Traffic(running.app_url):
        yield running


def test_watchdog_reaches_its_receiver_again_and_again(failing):
    first, second = arrived(failing, "Watchdog", count=2)[:2]
    assert without_ts(first) == {
        "status": "firing",
        "alertname": "Watchdog",
        "severity": "none",
        "receiver": "watchdog",
        "summary": RULES["Watchdog"]["annotations"]["summary"],
    }
    assert without_ts(second) == without_ts(first)


def test_the_error_budget_page_arrives_with_its_labels_and_annotations(failing):
    [page] = arrived(failing, "HelloErrorBudgetBurnFast")[:1]
    assert without_ts(page) == {
        "status": "firing",
        "alertname": "HelloErrorBudgetBurnFast",
        "severity": "page",
        "receiver": "page",
        "job": "hello",
        "slo": "availability-75",
        "summary": "hello is burning its 30-day error budget fast",
    }
    # The description is templated too; Alertmanager holds it as sent.
    description = alertmanager_alerts(failing)["HelloErrorBudgetBurnFast"]["annotations"]["description"]
    assert description.startswith("The availability SLO is 75% of responses not 5xx over 30 days")
    assert re.search(r"Error ratio over the long window: (8\d|9\d|100)(\.\d+)?%\.$", description), description


def test_the_page_silences_the_warning_and_the_ticket_for_the_same_failure(failing):
    arrived(failing, "HelloErrorBudgetBurnFast")
    # Both fire in Prometheus (BurnSlow's `for` is the longest, 15 s here) and
    # reach Alertmanager, which holds them back.
    inhibited(failing, "HelloErrorBudgetBurnFast", "HelloErrorRatioHigh", "HelloErrorBudgetBurnSlow")
    # Two more repeats of the page: the held-back groups were flushed as
    # often in the meantime, and would have been sent.
    sent = len(arrived(failing, "HelloErrorBudgetBurnFast"))
    arrived(failing, "HelloErrorBudgetBurnFast", count=sent + 2)
    names = {n["alertname"] for n in notifications(failing)}
    assert names == {"Watchdog", "HelloErrorBudgetBurnFast"}


def test_a_down_target_pages_and_silences_the_alerts_that_follow_from_it(tmp_path):
    with alerting_stack(tmp_path) as running:
        with Traffic(running.app_url):
            arrived(running, "HelloErrorBudgetBurnFast")
        running.app.terminate()
        assert running.app.wait(timeout=15) == 0
        [down] = arrived(running, "HelloTargetDown")[:1]
        instance = running.app_url.removeprefix("http://")
        assert without_ts(down) == {
            "status": "firing",
            "alertname": "HelloTargetDown",
            "severity": "page",
            "receiver": "page",
            "instance": instance,
            "job": "hello",
            "summary": f"Prometheus cannot scrape hello at {instance}",
        }
        # The error alerts go on firing from the samples still in their
        # windows; the down target silences them.
        inhibited(running, "HelloTargetDown", "HelloErrorBudgetBurnFast", "HelloErrorRatioHigh")
        arrived(running, "HelloTargetDown", count=3)
        lines = notifications(running)
        after = lines[lines.index(down) :]
        assert {n["alertname"] for n in after} <= {"HelloTargetDown", "Watchdog"}
