"""Shared by the script generators (scripts/*/make_scripts.py): write generated scripts, or check they are current."""
from __future__ import annotations

import textwrap
from pathlib import Path


def comment(lines: list[str], width: int = 116) -> list[str]:
    """Header lines as bash comments, long ones wrapped with their indent plus two spaces."""
    out = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()))
        parts = textwrap.wrap(line, width - 2, subsequent_indent=indent + "  ", break_on_hyphens=False,
                              break_long_words=False) or [""]
        out += [f"# {p}".rstrip() for p in parts]
    return out


def write_or_check(scripts: dict[str, str], folder: Path, check: bool, generator: str) -> int:
    """Write {file name: text} into `folder` (executable), or with `check` list the files that differ; exit code."""
    if check:
        stale = [name for name, text in scripts.items()
                 if not (folder / name).is_file() or (folder / name).read_text() != text]
        if stale:
            print(f"out of date (run python {generator}): " + ", ".join(stale))
            return 1
        print(f"{len(scripts)} scripts up to date")
        return 0
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    print(f"wrote {len(scripts)} scripts to {folder}")
    return 0


def generate(rows, script, folder: Path, argv: list[str]) -> int:
    """A generator's main: `script(*row) -> (name, text)` for every row, then write (or with --check, compare)."""
    scripts = {}
    for row in rows:
        name, text = script(*row)
        scripts[f"{name}.sh"] = text
    return write_or_check(scripts, folder, "--check" in argv, f"scripts/{folder.name}/make_scripts.py")
