"""check_links.py: the docs' relative links resolve, and a broken one is caught."""

from __future__ import annotations

from pathlib import Path

import check_links


def test_every_relative_link_in_the_docs_resolves() -> None:
    assert [p for f in check_links.default_files() for p in check_links.broken_links(f)] == []


def test_check_links_catches_a_missing_file_an_unknown_anchor_and_a_broken_image(tmp_path: Path, capsys) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Its `second` part: details\n")
    (tmp_path / "README.md").write_text(
        "See [the page](docs/page.md) and [its part](docs/page.md#its-second-part-details)"
        " and [the top](#intro).\n\n# Intro\n\n"
        "Broken: [gone](docs/gone.md), [no anchor](docs/page.md#nowhere), ![picture](docs/missing.png).\n"
        "```sh\ncat [not a link](nowhere.md)\n```\n"
        "Web links are not fetched: [web](https://example.invalid/x.md), and `[code](nowhere.md)` is code.\n"
    )
    assert check_links.main([str(tmp_path / "README.md")]) == 1
    err = capsys.readouterr().err
    assert "README.md:5: docs/gone.md (no such file" in err
    assert "README.md:5: docs/page.md#nowhere (no heading with anchor #nowhere" in err
    assert "README.md:5: docs/missing.png (no such file" in err
    assert "check_links: 3 broken link(s)" in err
    # Fixed, the same file passes.
    (tmp_path / "README.md").write_text(
        "See [the page](docs/page.md) and [its part](docs/page.md#its-second-part-details) and [the top](#intro).\n"
        "# Intro\n"
    )
    assert check_links.main([str(tmp_path / "README.md")]) == 0
