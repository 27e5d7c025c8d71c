# SPDX-License-Identifier: GPL-2.0-only
"""The documentation holds together: README.md stays one screen of map (at most 150 lines), every
relative link in README.md and docs/*.md reaches an existing file (and heading, for a link with
a #fragment), and no file of the project cites a Markdown document the project does not have
(issue 15: seven files once cited design notes that were never in the tree). No root needed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 150
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) outside code; images too. Targets with a scheme or mailto are external.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
# A Markdown file named anywhere in a text file: a path or a bare name ending in .md.
MD_REF = re.compile(r"[A-Za-z0-9_/.-]+\.md\b")
# .md names that are not the project's documents. Empty today; an external document (an RFC
# mirror, another project's README) cited by name would go here, with the reason.
EXTERNAL_MD: set[str] = set()
TEXT_SUFFIXES = {
    ".py", ".c", ".h", ".md", ".sh", ".toml", ".yml", ".yaml", ".json", ".conf", ".env",
    ".service", ".txt", ".cfg", ".ini", "",
}  # fmt: skip


def _tracked_files() -> list[Path]:
    """Files git tracks (the project), or, outside a git checkout, every file but the venv."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"],
            capture_output=True,
            check=True,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
        names = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def _strip_code_blocks(text: str) -> str:
    """Markdown without its fenced code blocks (a link inside one is not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = _strip_code_blocks(md.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_readme_fits_one_screen_of_map() -> None:
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines, more than {README_MAX_LINES}: move the long story to docs/"
    )


def test_the_four_documents_exist() -> None:
    for name in ("architecture.md", "design.md", "operations.md", "results.md"):
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing"


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    broken = []
    for m in LINK.finditer(_strip_code_blocks(md.read_text())):
        target = m.group(1)
        if EXTERNAL.match(target):
            continue
        path, _, fragment = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{md.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)


def test_no_file_cites_a_document_the_project_lacks() -> None:
    files = _tracked_files()
    have = {p.relative_to(ROOT).as_posix() for p in files if p.suffix == ".md"}
    have_names = {Path(p).name for p in have}
    missing = []
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            continue
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary (plots, ...): cites nothing
        rel = f.relative_to(ROOT).as_posix()
        for lineno, line in enumerate(text.splitlines(), 1):
            for ref in MD_REF.findall(line):
                ref = ref.rstrip(".")
                name = Path(ref).name
                if name in EXTERNAL_MD:
                    continue
                # Resolved from the repository root or from the citing file's folder (links);
                # a bare name or an install path (/opt/xfrm-fastpath/README.md) by its name.
                candidates = {
                    ref.lstrip("/"),
                    (Path(rel).parent / ref).as_posix(),
                }
                if candidates & have or (
                    ("/" not in ref or ref.startswith("/")) and name in have_names
                ):
                    continue
                if any((ROOT / c).resolve().is_file() for c in candidates):
                    continue
                missing.append(f"{rel}:{lineno}: {ref}")
    assert not missing, "documents cited but not in the project:\n  " + "\n  ".join(missing)
