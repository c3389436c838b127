"""The documentation holds together: every relative link resolves (files and headings), and every
`radlads ...` command the README shows parses with the CLI's own parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from radlads.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def prose(text: str) -> str:
    """The page without its fenced code blocks, where brackets are code, not links."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.*)$", prose(page.read_text()), re.M)}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def readme_commands() -> list[str]:
    """`radlads ...` command lines in the README's code blocks and inline code."""
    text = (ROOT / "README.md").read_text()
    blocks = "\n".join(m.group(0) for m in FENCE.finditer(text))
    lines = [*blocks.splitlines(), *INLINE_CODE.findall(prose(text))]
    commands = []
    for line in lines:
        for part in re.split(r"&&|\|", line.split(" #")[0]):
            words = shlex.split(part.strip().removeprefix("$ "))
            if words[:1] == ["radlads"]:
                commands.append(words[1:])
    return commands


def test_readme_shows_commands():
    assert {"demo", "convert", "eval", "generate", "plan"} <= {c[0] for c in readme_commands() if c}


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_readme_commands_parse(argv):
    build_parser().parse_args(argv)  # argparse exits on an unknown command or flag
