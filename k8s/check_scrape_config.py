"""promtool check config on k8s/prometheus-scrape-config.yml, even with Debian's promtool.

Debian builds Prometheus without Kubernetes service discovery, so its promtool
rejects any `kubernetes_sd_configs` ("field kubernetes_sd_configs not found").
With such a promtool this checks a copy in which each job's
kubernetes_sd_configs is replaced by a static target: everything else in the
job (relabel rules and their regexes, intervals, timeouts, paths) is still
checked by promtool, and test_k8s.py checks the discovery part against the
manifests. A promtool with Kubernetes SD checks the file itself.

    python k8s/check_scrape_config.py [PROMTOOL]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parent / "prometheus-scrape-config.yml"
NO_K8S_SD = "field kubernetes_sd_configs not found"


def without_kubernetes_sd(config: dict) -> dict:
    """config with each job's kubernetes_sd_configs swapped for a static target."""
    for job in config.get("scrape_configs", []):
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
    return config


def check(promtool: str = "promtool") -> int:
    args = [promtool, "check", "config", "--lint-fatal"]
    run = subprocess.run([*args, str(CONFIG)], capture_output=True, text=True)
    if NO_K8S_SD not in run.stdout + run.stderr:
        sys.stdout.write(run.stdout)
        sys.stderr.write(run.stderr)
        return run.returncode
    print(f"{promtool} has no Kubernetes SD (Debian's build): checking {CONFIG.name} with a static target instead")
    config = without_kubernetes_sd(yaml.safe_load(CONFIG.read_text()))
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as copy:
        yaml.safe_dump(config, copy, sort_keys=False)
        copy.flush()
        return subprocess.run([*args, copy.name]).returncode


if __name__ == "__main__":
    sys.exit(check(*sys.argv[1:2]))
