"""The repository's text speaks of the product: no development history, links that resolve, a short README.

- No tracked text file holds development-history words (work-session numbering, issue or design numbers, decision
  ids): docs and comments say what is true and why, never how or when it was developed.
- Every relative link in README.md and docs/**/*.md resolves to an existing file.
- README.md is at most 250 lines and opens with the two commands, the second exactly what CI (.ci/run) runs.
- Every ``docs/...`` file the code or the docs cite exists, and every ``docs/method.md`` section cited exists.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".sh", ".txt", ".cfg", ".toml"}
README_MAX_LINES = 250
README_COMMANDS = (
    "bash scripts/setup.sh && .venv/bin/gkd run          # set up (.venv) and run the main job on the embedded dataset",
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q tests   # set up and run the tests",
)

# history-patterns: begin. The scan skips this block of the file: it names what it looks for.
#: (pattern, what it is): case-insensitive unless the pattern says otherwise
HISTORY_PATTERNS = [
    (re.compile(r"\bstops? \d+", re.I), "a numbered work stop"),
    (re.compile(r"\b(this|that|previous|earlier|next|last) stop\b", re.I), "a work stop"),
    (re.compile(r"\bissues? #?\d+", re.I), "an issue number"),
    (re.compile(r"\b(the|this|that) issue's\b|\btargets? of the issue\b|\bjob's issue\b|\bissue [\"'\u201c]", re.I),
     "the issue as a work item"),
    (re.compile(r"\bdesigns? \d+", re.I), "a numbered design"),
    (re.compile(r"\bdecisions? G\d+", re.I), "a decision id"),
    (re.compile(r"\bG\d{1,2}\b"), "a decision id"),
    (re.compile(r"\b(this|that|a|the|earlier|previous|next|last|one) session\b", re.I), "a work session"),
    (re.compile(r"\blent to (this|the|us)\b|\ba lent\b", re.I), "a machine lent to the work"),
]
#: a line that speaks of a runtime's or pytest's session, not of a work session
SESSION_CONTEXT = re.compile(r"InferenceSession|SessionOptions|onnxruntime|\bort\b|pytest|session\.run|session\(", re.I)
#: (file, text on the line): uses checked by hand; each says why it is not history
ALLOWED: set[tuple[str, str]] = set()
#: what the patterns must catch, and runtime vocabulary that resembles it but must pass
#: (written as word lists joined at run time, so that this file does not itself hold the phrases it forbids)
EXAMPLES_BAD = [" ".join(words) for words in (
    ("measured at", "stop", "24"), ("as", "issue", "18", "asked"), ("design", "4", "changes each"),
    ("the project's", "decisions", "G4, G10"), ("see", "G7"), ("found in", "this", "session"),
    ("the GPU machine lent to", "this", "session"), ("the", "issue's", "target"),
    ("the targets of the main", "job's", "issue"))]
EXAMPLES_GOOD = ["sess = ort.InferenceSession(path)", "opts = ort.SessionOptions()", "def session(module):",
                 "the pytest session fails", "a non-stop loop", "the G-code writer", "stop the run",
                 "an issue tracker", "a bug in torch (pytorch/vision issues 9306 and 9462)", "NVIDIA/TensorRT#4248"]
#: a citation of a section docs/method.md does not have
EXAMPLE_MISSING_SECTION = "see docs/method.md, section 9.9"
# history-patterns: end


def _text_files() -> list[Path]:
    """Tracked text files (and new ones git does not ignore), relative to the repository root."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    files = sorted({Path(p) for p in out.split("\0") if p})
    return [p for p in files if p.suffix in TEXT_SUFFIXES and (ROOT / p).is_file()]


def _lines(path: Path) -> list[tuple[int, str]]:
    text = (ROOT / path).read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = list(enumerate(text, 1))
    if path.as_posix() == "tests/test_docs.py":  # its own pattern definitions
        begin = next(i for i, line in numbered if "history-patterns: begin" in line)
        end = next(i for i, line in numbered if "history-patterns: end" in line)
        numbered = [(i, line) for i, line in numbered if not begin <= i <= end]
    return numbered


def history_hits(path: Path) -> list[str]:
    """``file:line: what: the line`` for every development-history word in ``path``."""
    hits = []
    for no, line in _lines(path):
        for pattern, what in HISTORY_PATTERNS:
            m = pattern.search(line)
            if not m:
                continue
            if what == "a work session" and SESSION_CONTEXT.search(line):
                continue
            if what == "an issue number" and re.search(r"[\w.-]+/[\w.-]+\s*$", line[:m.start()]):
                continue  # an upstream project's issue ("pytorch/vision issues 9306")
            if any(path.as_posix() == f and text in line for f, text in ALLOWED):
                continue
            hits.append(f"{path.as_posix()}:{no}: {what} ({m.group(0)!r}): {line.strip()[:160]}")
    return hits


def test_no_development_history_in_tracked_text():
    hits = [h for p in _text_files() for h in history_hits(p)]
    assert not hits, "development history in the repository:\n" + "\n".join(hits)


def test_history_patterns_catch_history_and_spare_runtime_sessions(tmp_path, monkeypatch):
    """The scan fails on history words and passes the runtime vocabulary that resembles them."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "bad.md").write_text("\n".join(EXAMPLES_BAD))
    (tmp_path / "good.md").write_text("\n".join(EXAMPLES_GOOD))
    assert {int(h.split(":")[1]) for h in history_hits(Path("bad.md"))} == set(range(1, len(EXAMPLES_BAD) + 1))
    assert history_hits(Path("good.md")) == []


_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def broken_links(md: Path) -> list[str]:
    """``file: link`` for every relative link of a Markdown file that does not resolve to an existing file."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", md.read_text(encoding="utf-8")))
    bad = []
    for target in _LINK.findall(text):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        rel = target.split("#", 1)[0]
        if rel and not (md.parent / rel).exists():
            bad.append(f"{md.relative_to(ROOT) if md.is_relative_to(ROOT) else md}: {target}")
    return bad


def test_relative_markdown_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    bad = [b for page in pages for b in broken_links(page)]
    assert not bad, "links to files that do not exist:\n" + "\n".join(bad)


def test_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text("[ok](there.md#a) [web](https://example.com/x.md) [anchor](#top) `[code](gone.md)`\n"
                    "[gone](gone.md) [gone too](sub/gone.md#x)\n```\n[in a block](nowhere.md)\n```\n")
    assert broken_links(page) == [f"{page}: gone.md", f"{page}: sub/gone.md#x"]


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    body = [line for line in lines if line.strip()]
    assert body[0].startswith("# "), "README.md starts with its title"
    assert body[1].startswith("```"), "the title is followed by the commands' code block"
    assert tuple(body[2:4]) == README_COMMANDS and body[4] == "```", \
        "README.md opens with exactly the two commands:\n" + "\n".join(body[1:5])
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line]
    assert ci, ".ci/run runs the tests"
    assert README_COMMANDS[1].split("#")[0].strip() == ci[0], \
        f"CI runs {ci[0]!r}, the README says {README_COMMANDS[1]!r}"


_DOC_CITATION = re.compile(r"\bdocs/[A-Za-z0-9_./-]*[A-Za-z0-9_]\.(?:md|json|txt|py|sh)\b")
_METHOD_SECTION = re.compile(r"\b(?:docs/)?method\.md,? (?:sections? )?(\d+(?:\.\d+)?)(?: and (\d+(?:\.\d+)?))?")


def method_sections() -> set[str]:
    """Numbers of the sections of docs/method.md (``2``, ``2.4``, ``3.10`` ...)."""
    heads = re.findall(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs/method.md").read_text(), re.M)
    return set(heads)


def test_cited_docs_exist():
    missing, sections = [], method_sections()
    for path in _text_files():
        for no, line in _lines(path):
            for cited in _DOC_CITATION.findall(line):
                if not (ROOT / cited).exists():
                    missing.append(f"{path.as_posix()}:{no}: {cited}")
            for m in _METHOD_SECTION.finditer(line):
                missing += [f"{path.as_posix()}:{no}: docs/method.md section {s}" for s in m.groups()
                            if s and s not in sections]
    assert not missing, "cited but missing:\n" + "\n".join(missing)


def test_method_sections_are_parsed():
    sections = method_sections()
    assert {"2.2", "2.3", "2.4", "3.10", "4"} <= sections
    assert _METHOD_SECTION.search(EXAMPLE_MISSING_SECTION).group(1) == "9.9" and "9.9" not in sections
