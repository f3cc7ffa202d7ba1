"""The docs the code points at exist: every "PROTOCOL.md section N" the code cites is a section
of docs/PROTOCOL.md, and every relative link in README.md and docs/ leads to a file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"PROTOCOL\.md,? section (\d+)")
LINK = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")


def _sections() -> set[str]:
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    return set(re.findall(r"^## (\d+)\.", text, re.MULTILINE))


def test_every_cited_protocol_section_exists() -> None:
    sections = _sections()
    cited: dict[str, set[str]] = {}
    for pkg in ("node", "actors", "bridge", "devices", "tests", "docs"):
        for path in (ROOT / pkg).rglob("*"):
            if path.suffix in (".py", ".md", ".js", ".ts") and path.is_file():
                for number in CITATION.findall(path.read_text(errors="replace")):
                    cited.setdefault(number, set()).add(str(path.relative_to(ROOT)))
    assert cited, "the code cites the contract"
    missing = {n: sorted(paths) for n, paths in cited.items() if n not in sections}
    assert not missing, f"cited sections not in docs/PROTOCOL.md: {missing}"


def test_relative_links_in_the_docs_lead_to_files() -> None:
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if target.startswith(("http", "mailto")):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken
