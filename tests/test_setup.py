"""What a user's make targets install, and what git keeps out of the repository.

Each make target that runs a script installs one requirements file (through a
stamp in .venv). Read statically: every third-party module the script imports,
through the project's own modules, must come from that file, and each file
must hold nothing its targets do not import beyond the server's own
requirement: `make stack` must not pull in the linters and test tools.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = (ROOT / "Makefile").read_text()
LOCAL = {p.stem: p for p in (*ROOT.glob("*.py"), *(ROOT / "tools").glob("*.py"))}
# The targets a user runs a Python script with. `make profile` is left out:
# its extra requirement, py-spy, is a program it runs, not a module it imports.
TARGETS = ("run", "load", "stack", "queries", "report", "demo", "bench")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path) -> set[str]:
    """The distributions a requirements file installs by name, following -r."""
    out = set()
    for line in path.read_text().splitlines():
        line = line.partition("#")[0].strip()
        if line.startswith("-r "):
            out |= requirements(path.parent / line[3:].strip())
        elif line:
            out.add(_normal(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    return out


def rule(target: str) -> tuple[list[str], list[str]]:
    """(prerequisites, recipe lines) of a Makefile rule."""
    match = re.search(rf"^{re.escape(target)}:([^#\n]*)(?:##.*)?\n((?:\t.*\n)*)", MAKEFILE, re.M)
    assert match, f"no rule for {target} in the Makefile"
    return match[1].split(), [line.strip() for line in match[2].splitlines()]


def installed_by(target: str) -> tuple[str, set[str]]:
    """(stamp, distributions) a target's virtual-environment prerequisite installs."""
    [stamp] = [p for p in rule(target)[0] if p.startswith("$(VENV)/.")]
    [file] = [m for line in rule(stamp)[1] for m in re.findall(r"-r (\S+)", line)]
    return stamp, requirements(ROOT / file)


def script(target: str) -> Path:
    [path] = [m for line in rule(target)[1] for m in re.findall(r"\$\(PY\) (\S+\.py)", line)]
    return ROOT / path


def third_party_imports(path: Path, seen: set[Path] | None = None) -> set[str]:
    """Top-level names of the non-standard modules path imports, here or in any function, transitively."""
    seen = set() if seen is None else seen
    seen.add(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in (n.partition(".")[0] for n in names):
            if name in LOCAL:
                if LOCAL[name] not in seen:
                    out |= third_party_imports(LOCAL[name], seen)
            elif name not in sys.stdlib_module_names and name != "__future__":
                out.add(name)
    return out


def needed_by(target: str) -> set[str]:
    """The distributions that provide what a target's script imports."""
    providers = importlib.metadata.packages_distributions()
    out = set()
    for module in third_party_imports(script(target)):
        assert module in providers, f"{target}: no installed distribution provides {module!r}"
        out |= {_normal(d) for d in providers[module]}
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_installs_what_its_script_imports(target: str) -> None:
    stamp, installed = installed_by(target)
    missing = needed_by(target) - installed
    assert not missing, f"make {target} installs {stamp}, which lacks {sorted(missing)}"


def test_each_requirements_file_holds_only_what_its_targets_import() -> None:
    server = requirements(ROOT / "requirements.txt")
    needed: dict[str, set[str]] = defaultdict(set)
    for target in TARGETS:
        needed[installed_by(target)[0]] |= needed_by(target)
    for stamp, imports in needed.items():
        targets = [t for t in TARGETS if installed_by(t)[0] == stamp]
        extra = installed_by(targets[0])[1] - imports - server
        assert not extra, f"make {', '.join(targets)} install {sorted(extra)}, which none of them imports"


def test_the_docs_example_output_is_ignored_by_git() -> None:
    # `loadgen.py ... --json run.json` as the docs show it, run from the root,
    # and what make report and make bench write.
    paths = ("run.json", "build/report.png", "build/bench.json")
    git = shutil.which("git")
    inside = git and subprocess.run(
        [git, "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    if inside and inside.stdout.strip() == "true":
        for path in paths:
            ignored = subprocess.run([git, "check-ignore", "--quiet", "--no-index", path], cwd=ROOT, timeout=30)
            assert ignored.returncode == 0, f"git does not ignore {path}"
    else:
        # No git here (a tarball): the patterns themselves.
        patterns = (ROOT / ".gitignore").read_text().split()
        assert {"run.json", "/build/"} <= set(patterns)
