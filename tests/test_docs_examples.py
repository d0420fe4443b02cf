"""The documentation is checked like code: every ```python block of README.md and docs/*.md runs
as written, each in a fresh interpreter in an empty directory, and every relative link in those
files points at a file that exists (and, with a #fragment into a Markdown file, at one of its
headings). A block that is deliberately not runnable is marked with the line
`<!-- not run: <reason> -->` right before its fence."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import env

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 120

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^`\s]*)")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:.*-->\s*$")


def fenced_blocks(text: str) -> list[tuple[int, str, str, str]]:
    """(line of the opening fence, 1-based; info string; body, dedented; the last non-blank line
    before the fence) of every fenced code block."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            j += 1
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        blocks.append((i + 1, lang, textwrap.dedent("\n".join(lines[i + 1 : j])), before))
        i = j + 1
    return blocks


def python_examples() -> list[tuple[str, int, str]]:
    out = []
    for page in PAGES:
        for line, lang, body, before in fenced_blocks(page.read_text(encoding="utf-8")):
            if lang == "python" and not NOT_RUN.match(before):
                out.append((page.relative_to(ROOT).as_posix(), line, body))
    return out


EXAMPLES = python_examples()


def test_examples_found():
    # the README's psa.fit example at least; an empty list would make the test below vacuous
    assert any(page == "README.md" for page, _, _ in EXAMPLES), "no ```python block found in README.md"


@pytest.mark.slow
@pytest.mark.parametrize(("page", "line", "code"), EXAMPLES, ids=[f"{p}:{n}" for p, n, _ in EXAMPLES])
def test_python_example_runs(page: str, line: int, code: str, tmp_path: Path):
    where = f"{page}:{line}"
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True,
                           text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ```python block at {where} ran for more than {TIMEOUT_S} s")
    if r.returncode != 0:
        pytest.fail(f"the ```python block at {where} exited {r.returncode}:\n{r.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------
# links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1", re.S)
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def without_fences(text: str) -> str:
    """The text with every fenced code block blanked out (line numbers kept)."""
    lines = text.splitlines()
    fenced = set()
    for line, _, body, _ in fenced_blocks(text):
        fenced.update(range(line - 1, line + len(body.splitlines()) + 1))
    return "\n".join("" if i in fenced else s for i, s in enumerate(lines))


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    return INLINE_CODE.sub("", without_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in without_fences(page.read_text(encoding="utf-8")).splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment.lower() not in anchors(dest):
            bad.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT).as_posix()}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page: Path):
    bad = broken_links(page)
    assert not bad, f"{page.relative_to(ROOT).as_posix()}: broken links:\n" + "\n".join(bad)
