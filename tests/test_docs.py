"""The README and the docs pages: every link between them resolves (file and heading), and every
`gateskip` command they quote exists, with options the command has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not comments inside code blocks
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from gateskip.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def quoted_commands(page: Path) -> list[str]:
    """Every `gateskip ...` command line in the page's code (fenced blocks, continuation lines
    joined; inline code)."""
    text = page.read_text()
    commands = []
    for block in re.findall(r"```[\w-]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [m.group(0) for m in re.finditer(r"\bgateskip [a-z][\w-]*[^\n#|;&]*", joined)]
    inline = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [m.group(1) for m in re.finditer(r"`(gateskip [a-z][\w-]*[^`]*)`", inline)]
    return commands


def bad_commands(page: Path, known: dict[str, argparse.ArgumentParser]) -> list[str]:
    bad = []
    for command in quoted_commands(page):
        words = command.replace("\\|", " ").replace("|", " ").split()  # alternatives in table cells
        name = words[1]
        if name not in known:
            bad.append(f"{page.name}: `{command}` (no command {name!r})")
            continue
        options = {s for a in known[name]._actions for s in a.option_strings}
        for word in words[2:]:
            flag = word.split("=")[0].strip("[]`'\"(),")
            if flag.startswith("--") and flag not in options and flag != "--help":
                bad.append(f"{page.name}: `{command}` ({name} has no {flag})")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quoted_commands_exist(page):
    assert bad_commands(page, subcommands()) == []


def test_the_checks_catch_a_broken_link_and_a_command_that_does_not_exist(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](#title) [gone](missing.md) [no heading](#nowhere)\n\n"
        "```bash\ngateskip trace --text hi --out t.csv\ngateskip nosuch --x\ngateskip trace --no-such-flag 1\n```\n"
    )
    assert len(broken_links(page)) == 2
    assert [b.split("(")[-1] for b in bad_commands(page, subcommands())] == [
        "no command 'nosuch')",
        "trace has no --no-such-flag)",
    ]


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name not in ("results.md", "chat_examples.md"):  # generated tables, linked from their pages
            assert f"docs/{page.name}" in text, f"the README does not link {page.name}"


def test_the_readme_map_names_folders_that_exist():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Where things are", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    folders = [line.split()[0] for line in block.splitlines() if line.strip()]
    assert len(folders) >= 8
    assert [f for f in folders if not (ROOT / f).is_dir() or not (ROOT / f / "__init__.py").is_file()] == []
