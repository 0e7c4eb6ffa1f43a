"""The documentation's links: every relative link and ``#anchor`` in README.md and docs/*.md resolves, so a
page that is renamed or a heading that changes cannot leave a dead link behind."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links inside code blocks are code


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``, a
    repeated heading numbered ``-1``, ``-2``..."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+\s+(.*)$", _prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
    return {slug if n == 0 else f"{slug}-{n}" for slug, total in seen.items() for n in range(total)}


def test_the_docs_pages_exist():
    names = {p.name for p in PAGES}
    assert {"architecture.md", "configuration.md", "errors.md", "resuming.md", "testing.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


def test_the_readme_stays_short():
    """The README is for the first ten minutes; the reference lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
