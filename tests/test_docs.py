"""The documentation's relative links resolve: every ``[text](path)`` / ``![alt](path)`` of the
README, ``docs/*.md`` and the pipeline READMEs points to an existing file, and a ``#section``
in a link to a markdown page names one of that page's headings."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted({ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("CBP-QSNN-*/**/README.md")})

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str, blank_code: bool = True) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked (``blank_code``)."""
    out, fence = [], None
    for line in text.splitlines():
        mark = re.match(r"^\s*(`{3,}|~{3,})", line)
        if mark:
            if fence is None:
                fence = mark.group(1)[0] * len(mark.group(1))
            elif mark.group(1).startswith(fence):
                fence = None
            continue
        if fence is None:
            out.append(re.sub(r"(`+)(.+?)\1", "``", line) if blank_code else line)
    return out


def links(text: str) -> list[str]:
    targets = []
    for line in _prose_lines(text):
        targets += LINK.findall(line)
        ref = REFERENCE.match(line)
        if ref:
            targets.append(ref.group(1))
    return targets


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # link text only
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(page.read_text(encoding="utf-8"), blank_code=False):
        head = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not head:
            continue
        base = slug(head.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken(page: Path) -> list[str]:
    bad = []
    for target in links(page.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a web address
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            bad.append(f"{target}: {dest.name} has no heading #{anchor}")
    return bad


def test_the_pages_exist():
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert {"README.md", "CBP-QSNN-STBP/README.md", "CBP-QSNN-TSSL-BP/README.md",
            "CBP-QSNN-SEW-ResNet/README.md", "CBP-QSNN-SNN-Calibration/README.md",
            "docs/lifecycle.md", "docs/mini_replication.md", "docs/benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    bad = broken(page)
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_the_readme_links_every_docs_page():
    readme = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text())}
    for page in ROOT.glob("docs/*.md"):
        assert page.resolve() in readme, f"README.md does not link {page.relative_to(ROOT)}"


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "b.md").write_text("# Title\n\n## A `code` section: here\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md) [ok](b.md#title) [ok](b.md#a-code-section-here) [web](https://x.y)\n"
                    "[gone](missing.md) [bad anchor](b.md#nope) ![img](fig.png)\n"
                    "`[not a link](nowhere.md)`\n```\n[in code](nowhere.md)\n```\n"
                    "[ref]: also_missing.md\n")
    assert broken(page) == ["missing.md: no such file", "b.md#nope: b.md has no heading #nope",
                            "fig.png: no such file", "also_missing.md: no such file"]
