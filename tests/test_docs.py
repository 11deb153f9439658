"""README.md and docs/*.md: every relative link resolves, the README stays a five-minute read.

A link is `[text](target)` outside code; http(s) and mailto targets are not fetched. `path#anchor` needs the file
and, in a .md file, a heading whose GitHub slug is the anchor; a bare `#anchor` is a heading of the same page.
"""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _without_code_blocks(path: Path) -> str:
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)


def links(path: Path) -> list[str]:
    """Relative link targets of a page (inline code is replaced, so a `[x](y)` written as code is not a link)."""
    text = re.sub(r"`[^`\n]*`", "code", _without_code_blocks(path))
    return [t for t in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text) if not re.match(r"(https?|mailto):", t)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} +(.+)$", _without_code_blocks(path), flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    found = links(page)
    assert found, f"{page.name}: no links found; every page links at least to the README or docs/"
    broken = []
    for target in found:
        file, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file)).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading in {dest.name} has the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in links(README)}
    unlinked = [p.name for p in PAGES[1:] if p not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_readme_is_short_and_names_the_test_command():
    lines = README.read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; move reference material to docs/"
    assert any("make test" in line for line in lines)
