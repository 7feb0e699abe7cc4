"""Stand-in images for docker-compose.yml, built from Debian's packages.

Where no image registry is reachable (CI machines here), ``python:…-slim``,
``prom/prometheus`` and ``prom/alertmanager`` cannot be pulled. This builds
images that stand in for them from Debian bookworm's packages, named for what
they are, and prints the variables that make docker-compose.yml use them::

    python tools/standins.py          # build what is missing or stale, print the variables
    eval "$(python tools/standins.py --quiet)" && docker compose up --build --wait app prometheus

The base is ``debootstrap --variant=minbase bookworm`` imported into Docker;
each stand-in is a Dockerfile in tools/standins/ on that base. Every image
carries the hash of its recipe in a label, and a build is skipped while an
image with the same recipe exists: only the first run takes minutes.
No Grafana stand-in exists (neither Debian nor PyPI packages Grafana).

Needs root (debootstrap), Debian's ``debootstrap`` and a Docker engine; the
Python stand-in's wheelhouse is downloaded on the host by pip.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = Path(__file__).resolve().parent / "standins"
LABEL = "org.hello-monitoring.standin-recipe"
SUITE = "bookworm"
MIRROR = os.environ.get("HELLO_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE = f"hello-standin/debian:{SUITE}"


@dataclass(frozen=True)
class Standin:
    image: str
    dockerfile: str
    variable: str  # the docker-compose.yml / Dockerfile variable naming the image
    replaces: str
    wheels: bool = False  # carries a wheelhouse of requirements.txt


STANDINS = (
    Standin("hello-standin/python:3.11", "python.Dockerfile", "PYTHON_IMAGE", "python:3.11-slim-bookworm", True),
    Standin("hello-standin/prometheus:2.42", "prometheus.Dockerfile", "PROMETHEUS_IMAGE", "prom/prometheus"),
    Standin("hello-standin/alertmanager:0.25", "alertmanager.Dockerfile", "ALERTMANAGER_IMAGE", "prom/alertmanager"),
)


class StandinError(RuntimeError):
    """A build step failed; the message says which and how to fix it."""


def docker_cli() -> str:
    """The docker CLI: $DOCKER, else Debian's /usr/bin/docker, else the one on PATH.

    Debian's CLI matches Debian's engine; another client earlier on PATH may
    speak a newer API or be configured for another context.
    """
    if explicit := os.environ.get("DOCKER"):
        return explicit
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if found is None:
        raise StandinError("no docker CLI: `make docker-tools` installs Debian's docker.io")
    return found


def docker(*args: str, capture: bool = False, quiet: bool = False, **kwargs: object) -> str:
    """Run docker args; its stdout if capture. StandinError (with its output) on failure."""
    result = subprocess.run(
        [docker_cli(), *args],
        stdout=subprocess.PIPE if capture or quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        text=True,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )
    if result.returncode != 0:
        output = f":\n{result.stdout[-3000:]}" if result.stdout else ""
        raise StandinError(f"docker {' '.join(args[:3])} … exited with status {result.returncode}{output}")
    return result.stdout or ""


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()[:16]


def base_recipe() -> str:
    return _digest(b"debootstrap --variant=minbase", SUITE.encode(), MIRROR.encode())


def recipe(standin: Standin) -> str:
    """The hash of everything a stand-in is built from."""
    parts = [base_recipe().encode(), (RECIPES / standin.dockerfile).read_bytes()]
    if standin.wheels:
        parts.append((ROOT / "requirements.txt").read_bytes())
    return _digest(*parts)


def _inspect(image: str, template: str) -> str | None:
    result = subprocess.run(
        [docker_cli(), "image", "inspect", "--format", template, image], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else None


def current_recipe(image: str) -> str | None:
    """The recipe label of a local image, or None if there is no such image."""
    return _inspect(image, f'{{{{index .Config.Labels "{LABEL}"}}}}')


def _remove_superseded(previous: str | None, image: str) -> None:
    """Remove the image a rebuild replaced, unless something still uses it.

    Only this program's own stand-ins get here: no other image is touched.
    """
    if previous and previous != _inspect(image, "{{.Id}}"):
        subprocess.run([docker_cli(), "image", "rm", previous], capture_output=True, check=False)


def build_base(log: Callable[[str], None] = print) -> bool:
    """debootstrap bookworm minbase into an image; False if an up-to-date one exists."""
    want = base_recipe()
    if current_recipe(BASE) == want:
        return False
    if shutil.which("debootstrap") is None:
        raise StandinError("debootstrap is not installed: `make docker-tools` installs it")
    log(f"standins: debootstrap {SUITE} minbase into {BASE} (about a minute)")
    previous = _inspect(BASE, "{{.Id}}")
    with tempfile.TemporaryDirectory(prefix="hello-standin-") as tmp:
        root = Path(tmp) / "root"
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StandinError(f"debootstrap failed (root is needed):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:
            docker(
                "import",
                "--change",
                f"LABEL {LABEL}={want}",
                "--change",
                'CMD ["bash"]',
                "-",
                BASE,
                quiet=True,
                stdin=tar.stdout,
            )
    _remove_superseded(previous, BASE)
    return True


def _wheelhouse(directory: Path) -> None:
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    result = subprocess.run(
        [*pip, "-d", str(directory), "-r", str(ROOT / "requirements.txt")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StandinError(f"pip could not download the wheelhouse:\n{result.stderr[-2000:]}")


def build(standin: Standin, log: Callable[[str], None] = print) -> bool:
    """Build one stand-in on the base; False if an image with the same recipe exists."""
    want = recipe(standin)
    if current_recipe(standin.image) == want:
        return False
    log(f"standins: building {standin.image} (stands in for {standin.replaces})")
    previous = _inspect(standin.image, "{{.Id}}")
    with tempfile.TemporaryDirectory(prefix="hello-standin-") as tmp:
        context = Path(tmp)
        (context / "wheels").mkdir()
        if standin.wheels:
            _wheelhouse(context / "wheels")
        docker(
            "build",
            "--quiet",
            "--build-arg",
            f"BASE={BASE}",
            "--label",
            f"{LABEL}={want}",
            "--tag",
            standin.image,
            "--file",
            str(RECIPES / standin.dockerfile),
            str(context),
            quiet=True,
        )
    _remove_superseded(previous, standin.image)
    return True


def build_all(log: Callable[[str], None] = print) -> dict[str, str]:
    """Build whatever is missing or stale; {variable: image} for docker compose."""
    build_base(log)
    for standin in STANDINS:
        build(standin, log)
    return {s.variable: s.image for s in STANDINS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build images from Debian's packages that stand in for python, prom/prometheus and "
        "prom/alertmanager where no registry is reachable; print the variables docker compose reads.",
        epilog="Exit status: 0 built or up to date, 1 a build step failed.",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the export lines")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        variables = build_all(log)
    except StandinError as e:
        print(f"standins: {e}", file=sys.stderr)
        return 1
    for name, image in variables.items():
        print(f"export {name}={image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
