# The hello server as a container image: `make up` builds and runs it with
# Prometheus and Grafana (docker-compose.yml).
# The base is a build argument so that it can be replaced without editing this
# file (e.g. by the stand-ins of tools/standins.py where no registry is
# reachable); the default is the pinned upstream image.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

# No .pyc files in the image, logs straight to `docker logs`, no pip cache.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes reuse this layer. requirements.txt pins
# every version.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY hello_server.py metrics.py connections.py ./

# An unprivileged user with no home and no shell; the code stays root-owned
# and read-only to it.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin hello
USER 10001

# Flags default to HELLO_* variables (see README): docker run -e HELLO_FAILURE_RATE=0 ...
ENV HELLO_HOST=0.0.0.0 \
    HELLO_PORT=8080
EXPOSE 8080

# Python's own urllib, no curl in the image. /metrics, because it is not
# counted in the request metrics and never sleeps or fails by design.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['HELLO_PORT'] + '/metrics', timeout=2)"]

# Exec form: Python is PID 1 and gets docker stop's SIGTERM itself, which the
# server answers with a graceful shutdown.
CMD ["python", "hello_server.py"]
