"""The documentation holds together: every relative link in README.md, NEWS.md,
SECURITY.md, docs/ and man/ resolves (the file exists; a #fragment names a heading of the
markdown file it points into), the README stays short and starts with the two set-up
commands CI and readers run, and the repository root holds what a reader expects there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "NEWS.md", ROOT / "SECURITY.md",
                *(ROOT / "docs").rglob("*.md"), *(ROOT / "man").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _links(text: str) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(text)


def _anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    broken = []
    for target in _links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved}")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_link_check_sees_links():
    assert _links("see [a](x.md#y) and `[b](no)`") == ["x.md#y"]
    assert _anchor("A node check: `cdi-hook doctor`") == "a-node-check-cdi-hook-doctor"
    assert "which-way-for-which-runtime" in _anchors(ROOT / "README.md")


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    assert lines[2] == "```sh"
    assert lines[3].startswith("bash scripts/setup && bash examples/demo/run ")
    assert lines[4].startswith("bash scripts/test ")


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(readme)}
    unlinked = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_root_holds_what_a_reader_expects():
    assert not (ROOT / "config.json").exists(), "a stray runc config.json at the repository root"
