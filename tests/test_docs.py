"""The docs' code runs: the README's instrumentation example and design.md's textbook version.

Each snippet is cut out of its Markdown file as a user would copy it, saved as
a module, started on a loopback port with the registry it creates itself, and
sent known traffic; the exposition must then count exactly that traffic.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def python_block(markdown: Path, marker: str) -> str:
    """The ```python block of markdown whose text contains marker."""
    blocks = re.findall(r"^```python\n(.*?)^```$", markdown.read_text(), flags=re.S | re.M)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{markdown.name}: expected one python block containing {marker!r}, found {len(found)}"
    return found[0]


def load(source: str, name: str, tmp_path: Path) -> ModuleType:
    """Import source as module name from tmp_path, as `python name.py` would see it (minus __main__)."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(server) -> str:
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def settled(base: str) -> dict:
    """A scrape taken once no request is in flight: the last responses are counted by then."""
    deadline = time.monotonic() + 10
    while True:
        scraped = samples(base)
        if scraped[("http_requests_in_flight", ())] == 0 or time.monotonic() > deadline:
            return scraped
        time.sleep(0.01)


def send_known_traffic(base: str) -> None:
    assert [get(base + "/hello") for _ in range(3)] == [200, 200, 200]
    assert get(base + "/nope") == 404
    assert get(base + "/metrics") == 200  # never counted


def assert_counts(scraped: dict) -> None:
    assert scraped[("http_requests_total", (("path", "/hello"),))] == 3
    assert scraped[("http_requests_total", (("path", "other"),))] == 1
    assert scraped[("response_status_total", (("status", "200"),))] == 3
    assert scraped[("response_status_total", (("status", "404"),))] == 1
    assert scraped[("http_response_time_seconds_count", (("path", "/hello"),))] == 3
    assert scraped[("http_response_time_seconds_bucket", (("le", "+Inf"), ("path", "/hello")))] == 3
    assert scraped[("http_response_time_seconds_count", (("path", "other"),))] == 1
    assert scraped[("http_requests_in_flight", ())] == 0
    assert not any(name == "http_requests_total" and ("path", "/metrics") in labels for name, labels in scraped)


def test_the_readme_instrumentation_example_runs_and_counts_exactly(tmp_path: Path, serve) -> None:
    source = python_block(ROOT / "README.md", "from metrics import HTTPMetrics, instrument")
    my_server = load(source, "my_server", tmp_path)
    base = serve(my_server.make_server(port=0))
    send_known_traffic(base)
    scraped = settled(base)
    assert_counts(scraped)
    assert ("process_cpu_seconds_total", ()) in scraped


def test_the_design_page_textbook_version_runs_and_counts_exactly(tmp_path: Path, serve) -> None:
    source = python_block(ROOT / "docs" / "design.md", "from prometheus_client import CollectorRegistry, Counter")
    textbook = load(source, "textbook_server", tmp_path)
    base = serve(textbook.make_server(port=0))
    send_known_traffic(base)
    assert_counts(settled(base))
