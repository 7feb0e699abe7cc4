"""Shared test set-up: under CI=true a skipped test is a failure.

A test that needs a tool (promtool, prometheus) may skip on a developer's
machine that lacks it, never in CI, where `make test` has installed it.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """The path of a command-line tool; skip without it, fail in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed; `make tools` installs it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every test: {report.longrepr}"
