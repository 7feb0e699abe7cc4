"""The few calls of Prometheus' HTTP API the tools make, with errors that say what to do.

queries.py, report.py, audit.py and stack.py all talk to Prometheus through
here, so a wrong ``--prometheus`` reads the same everywhere: one line naming
the URL and what was expected instead of a traceback. Standard library only:
``make load`` runs the audit with nothing but the server's requirements.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

EXAMPLE = "http://localhost:9090"


class PrometheusError(RuntimeError):
    """Prometheus is not where the URL says, or it refused a query."""


def base_url(url: str) -> str:
    """url without a trailing slash, if it can be a Prometheus base URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PrometheusError(f"{url!r} is not a URL; expected a Prometheus base URL like {EXAMPLE}")
    try:
        parts.port  # noqa: B018 (raises on a port out of range)
    except ValueError:
        raise PrometheusError(f"{url!r} has a bad port; expected a Prometheus base URL like {EXAMPLE}") from None
    return url.rstrip("/")


def api(url: str, endpoint: str, params: dict[str, Any], timeout: float = 10.0) -> Any:
    """The ``data`` of GET {url}/api/v1/{endpoint}?params."""
    url = base_url(url)
    request = f"{url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
    except urllib.error.HTTPError as e:
        # Prometheus explains a bad query in a JSON body with a 400 or 422.
        text = e.read()
        status = f"HTTP {e.code}"
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            raise PrometheusError(f"nothing listening at {url}: start Prometheus with `make stack`") from None
        raise PrometheusError(f"cannot reach Prometheus at {url}: {e.reason}") from None
    except (TimeoutError, ConnectionError) as e:
        raise PrometheusError(f"cannot reach Prometheus at {url}: {e}") from None
    else:
        status = "HTTP 200"
    try:
        body = json.loads(text)
        ok = body["status"] == "success"
    except (ValueError, TypeError, KeyError):
        raise PrometheusError(
            f"{url} answered {status} to /api/v1/{endpoint} but is not a Prometheus API; "
            f"expected a Prometheus base URL like {EXAMPLE} (not the app's)"
        ) from None
    if not ok:
        raise PrometheusError(f"Prometheus at {url} rejected {params.get('query')!r}: {body.get('error', body)}")
    return body["data"]


def query(url: str, expr: str, at: float | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """An instant query; the result vector (empty if no series matched)."""
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = at
    data = api(url, "query", params, timeout)
    result = data["result"]
    # A scalar or string result is one [time, value] pair, not a vector.
    return result if data["resultType"] in ("vector", "matrix") else [{"metric": {}, "value": result}]


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """A range query; one {metric, values} entry per series."""
    return api(url, "query_range", {"query": expr, "start": start, "end": end, "step": step})["result"]


def query_exemplars(url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    """The exemplars of the series expr selects in [start, end]: one {seriesLabels, exemplars} entry per series."""
    return api(url, "query_exemplars", {"query": expr, "start": start, "end": end})
