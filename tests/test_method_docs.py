"""Every `§` citation in the repository resolves to a section of docs/methods/ (docs/methods/README.md).

A named citation `speed.md §3.4` (or `§5.1 item 2`, `§9.1 items 3 and 7`) must land on a numbered heading of
docs/methods/speed.md (`## 3.` / `### 3.4 ...`), and a cited item on a numbered list item inside that section. A bare
`§N` means the document named most recently before it in the same file (or, before the first name, the first document
the file names); a file that cites bare sections without naming any document fails. `paper §N` cites a paper, not a
method document, and is skipped.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods"
DOCS = ("idc_dream", "speed", "decoupled")
SKIP_DIRS = {".git", ".venv", "tests", "__pycache__", "node_modules"}

NAME = re.compile(r"\b(" + "|".join(DOCS) + r")\.md\b")
CITE = re.compile(r"(?<!paper )§ ?(\d+(?:\.\d+)*)(?:\s+items?\s+(\d+(?:\s*(?:[-–,/]|and)\s*\d+)*))?")
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?(?:\s|$)")
ITEM = re.compile(r"^\s*(\d+)\.\s")


def sections(text):
    """{section number: set of numbered list items inside it (its own lines, not its sub-sections')}."""
    out, current = {}, None
    for line in text.splitlines():
        m = HEADING.match(line)
        if m:
            current = m.group(1)
            out.setdefault(current, set())
        elif line.startswith("#"):
            current = None
        elif current is not None and (m := ITEM.match(line)):
            out[current].add(int(m.group(1)))
    return out


def cited_items(spec):
    if not spec:
        return []
    nums = [int(n) for n in re.findall(r"\d+", spec)]
    if re.search(r"[-–]", spec) and len(nums) == 2:
        return list(range(nums[0], nums[1] + 1))
    return nums


def citations(text):
    """[(document or None, section, [items], position)] in file order; bare citations resolved as documented above."""
    names = [(m.start(), m.group(1)) for m in NAME.finditer(text)]
    out = []
    for m in CITE.finditer(text):
        before = [d for pos, d in names if pos < m.start()]
        doc = before[-1] if before else (names[0][1] if names else None)
        out.append((doc, m.group(1), cited_items(m.group(2)), text.count("\n", 0, m.start()) + 1))
    return out


def unresolved(text, docs):
    """Messages for every citation in `text` that does not land on a heading (and item) of `docs`."""
    bad = []
    for doc, sec, items, line in citations(text):
        if doc is None:
            bad.append(f"line {line}: bare §{sec} but the file names no method document")
        elif sec not in docs[doc]:
            bad.append(f"line {line}: {doc}.md §{sec} has no heading in docs/methods/{doc}.md")
        else:
            bad += [f"line {line}: {doc}.md §{sec} has no item {k}" for k in items if k not in docs[doc][sec]]
    return bad


def repo_files():
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.suffix in (".py", ".sh", ".md") and path.is_file() and not SKIP_DIRS & set(rel.parts) \
                and rel.parts[:2] != ("docs", "methods"):
            yield rel


@pytest.fixture(scope="module")
def method_docs():
    return {d: sections((METHODS / f"{d}.md").read_text(encoding="utf-8")) for d in DOCS}


def test_method_documents_say_how_they_are_cited(method_docs):
    for d in DOCS:
        head = "\n".join((METHODS / f"{d}.md").read_text(encoding="utf-8").splitlines()[:6])
        assert f"`{d}.md §N`" in head, d
        assert len(method_docs[d]) >= 10, d
    assert "docs/methods/X.md" in (METHODS / "README.md").read_text(encoding="utf-8")


def test_every_citation_in_the_repository_resolves(method_docs):
    bad, count = [], 0
    for rel in repo_files():
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        count += len(citations(text))
        bad += [f"{rel}: {msg}" for msg in unresolved(text, method_docs)]
    assert count > 1000  # the scan found the code's citations at all
    assert not bad, "\n".join(bad)


def test_bare_citations_follow_the_most_recent_named_document():
    text = "docstring (speed.md)\n§1.4 here\nidc_dream.md §2.4 and §2.5, §5 items 3 and 7, §9.1 items 2-4\n"
    assert citations(text) == [("speed", "1.4", [], 2), ("idc_dream", "2.4", [], 3), ("idc_dream", "2.5", [], 3),
                               ("idc_dream", "5", [3, 7], 3), ("idc_dream", "9.1", [2, 3, 4], 3)]
    assert citations("see §3 first, then decoupled.md §4")[0][0] == "decoupled"
    assert citations("paper §3 only") == []


def test_a_missing_section_or_item_fails(tmp_path, method_docs):
    doc = tmp_path / "speed.md"
    doc.write_text("# t\n## 1. A\n### 1.1 B\n1. first\n2. second\n## 2. C\n", encoding="utf-8")
    docs = {"speed": sections(doc.read_text(encoding="utf-8"))}
    assert docs["speed"] == {"1": set(), "1.1": {1, 2}, "2": set()}
    code = tmp_path / "stage.py"
    code.write_text('"""Follows speed.md."""\n# §1.1 item 2, speed.md §2\n# §1.2\n# speed.md §1.1 item 3\n',
                    encoding="utf-8")
    assert unresolved(code.read_text(encoding="utf-8"), docs) == [
        "line 3: speed.md §1.2 has no heading in docs/methods/speed.md",
        "line 4: speed.md §1.1 has no item 3"]
    assert unresolved("# §4 with no document named", docs) == [
        "line 1: bare §4 but the file names no method document"]
    # and against the real documents: a section that does not exist is reported
    assert unresolved("decoupled.md §99.1", method_docs) == [
        "line 1: decoupled.md §99.1 has no heading in docs/methods/decoupled.md"]


def test_no_file_points_to_the_notes_outside_the_repository():
    outside = [str(rel) for rel in repo_files()
               if "shared/specs/" in (ROOT / rel).read_text(encoding="utf-8", errors="replace")]
    assert outside == []
