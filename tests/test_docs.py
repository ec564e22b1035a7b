"""The documentation runs: every command that README.md and docs/*.md mark as runnable is run here as a
reader would run it, and every relative link in them points at a file (and heading) that exists.

The convention (also in CONTRIBUTING.md, "Runnable documentation"): a fenced block is run when the line
directly above its opening fence is exactly `<!-- runnable -->` (an HTML comment, so GitHub shows
nothing). A ```bash block runs in `bash` with `set -euo pipefail`; a ```python block runs in this
interpreter. The runnable blocks of one file run in order, in one fresh temporary folder (a later block
may use what an earlier one wrote), with this interpreter's folder (the repo's venv) first on PATH, so
`sdtorch` and `python` are the ones under test, and with OMP_NUM_THREADS=1 unless it is set (on a
quiet 2-core CPU these runs took about as long on one thread as on two, 43 and 41 s on 2026-12-01;
when other jobs share the CPU, one thread is many times faster). Each block must exit 0. Blocks that
install (pip), need weights that are not shipped, or take long are left unmarked.

Where a runnable block would take long as written, `SUBSTITUTIONS` shrinks its settings before it runs.
The table is the only place where what runs differs from what the reader sees, and every entry must
match in its file, so the table cannot go stale unnoticed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python"}
README_MAX_LINES = 260
BLOCK_TIMEOUT_S = 600

# (file, regex, replacement, why): applied to that file's runnable blocks, in order, before they run
SUBSTITUTIONS = [
    ("docs/training.md", r"--count 200\b", "--count 24",
     "24 images: the default --val-size 16 holds 16 out for validation, 8 are trained on"),
    ("docs/training.md", r"--max-steps 200\b", "--max-steps 2", "2 steps: the run's files are all written"),
    ("docs/training.md", r"--sample-steps 10\b", "--sample-steps 2", "the final sample grid at 2 sampler steps"),
    ("docs/training.md", r"--steps 10\b", "--steps 2", "generate with 2 sampler steps"),
]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fenced_blocks(text: str) -> list[dict]:
    """Every fenced block: {"line" (1-based, of the opening fence), "lang", "runnable", "code"}."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group(2), i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        blocks.append({"line": start + 1, "lang": m.group(3).lower(),
                       "runnable": start > 0 and lines[start - 1].strip() == MARKER, "code": "\n".join(body) + "\n"})
        i += 1
    return blocks


def runnable_blocks(path: Path) -> list[dict]:
    blocks = [b for b in fenced_blocks(path.read_text(encoding="utf-8")) if b["runnable"]]
    for b in blocks:
        for file, pattern, replacement, _why in SUBSTITUTIONS:
            if file == _rel(path):
                b["code"] = re.sub(pattern, replacement, b["code"])
    return blocks


def _docs_with_runnable_blocks() -> list[Path]:
    return [p for p in DOCS if p.is_file() and runnable_blocks(p)]


@pytest.mark.parametrize("doc", _docs_with_runnable_blocks(), ids=_rel)
def test_runnable_blocks_exit_0(doc: Path, tmp_path: Path):
    env = {"OMP_NUM_THREADS": "1", **os.environ,
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    for block in runnable_blocks(doc):
        where = f"{_rel(doc)}:{block['line']}"
        assert block["lang"] in LANGUAGES, f"{where}: a runnable block must be bash or python, not {block['lang']!r}"
        if LANGUAGES[block["lang"]] == "bash":
            argv, stdin = ["bash", "-c", "set -euo pipefail\n" + block["code"]], None
        else:
            argv, stdin = [sys.executable, "-"], block["code"]
        done = subprocess.run(argv, input=stdin, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
        assert done.returncode == 0, (f"{where}: exit code {done.returncode}\n--- block as run:\n{block['code']}"
                                      f"--- stdout (end):\n{done.stdout[-3000:]}\n"
                                      f"--- stderr (end):\n{done.stderr[-3000:]}")


def test_every_marker_opens_a_block():
    for doc in DOCS:
        if not doc.is_file():
            continue
        lines = doc.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if line.strip() == MARKER:
                after = lines[n + 1] if n + 1 < len(lines) else ""
                assert re.match(r"^\s*(`{3,}|~{3,})", after), \
                    f"{_rel(doc)}:{n + 1}: {MARKER} is not followed by a fence"


def test_every_substitution_applies():
    for file, pattern, _replacement, why in SUBSTITUTIONS:
        code = "".join(b["code"] for b in fenced_blocks((ROOT / file).read_text(encoding="utf-8")) if b["runnable"])
        assert re.search(pattern, code), f"{file}: substitution {pattern!r} ({why}) matches no runnable block"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    prose = _without_code(path.read_text(encoding="utf-8"), inline=False)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M)}


def _without_code(text: str, inline: bool = True) -> str:
    """The text with fenced blocks blanked out (line count kept), and inline code spans removed too
    unless `inline` is False (a heading's code is part of its anchor)."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and m:
            fence = m.group(1)
            out.append("")
        elif fence is not None:
            if re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
                fence = None
            out.append("")
        else:
            out.append(re.sub(r"`[^`]*`", "", line) if inline else line)
    return "\n".join(out)


@pytest.mark.parametrize("doc", [p for p in DOCS if p.is_file()], ids=_rel)
def test_relative_links_resolve(doc: Path):
    prose = _without_code(doc.read_text(encoding="utf-8"))
    links = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{_rel(doc)}: link {target!r} points at {dest}, which does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{_rel(doc)}: link {target!r}: no heading #{anchor} in {dest.name}"


def test_link_pattern_finds_the_readme_links():
    prose = _without_code((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "docs/shapes-grid.png" in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)", prose)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it at most {README_MAX_LINES} (move detail to docs/)"


def test_readme_quickstart_is_what_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci) == 1, ".ci/run: expected one command line starting with 'python3 -m venv'"
    assert ci[0] in (ROOT / "README.md").read_text(encoding="utf-8"), "README's command 2 differs from .ci/run's"
