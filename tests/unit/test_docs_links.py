"""README.md, docs/, tests/ and the code stay self-contained: no links out of the repository
(research notes in a sibling directory, absolute paths of one machine), and every file
the docs and tests name exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SELF = Path(__file__).resolve()
#: A path into the repository written in prose, a backtick or a link.
NAMED = re.compile(r"(?<![\w./-])((?:docs|tests|netbootd|config|images|systemd|bench)/"
                   r"[\w./-]*\.(?:md|py|yaml|j2|sh|service|c|toml))\b")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
#: Paths of the machines the project is developed on, never of a user's.
OUTSIDE = re.compile(r"\.\./shared|(?<![\w/])/work/|file:///(?!opt/netbootd)")


def texts() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "images").glob("*.md")),
             *sorted(p for p in (REPO / "tests").rglob("*.py") if p.resolve() != SELF)]
    return [f for f in files if f.is_file()]


def code() -> list[Path]:
    """The product's, the image builders' and the benchmarks' sources (their docstrings and
    comments are documentation too)."""
    # images/ holds the store of a checkout that serves (large trees): only its builders
    found = [*(REPO / "images").glob("*.py"), *(REPO / "images" / "installer").rglob("*")]
    for d in ("netbootd", "bench", "systemd", "config", ".ci"):
        found += (REPO / d).rglob("*")
    return sorted(p for p in found if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix in (".py", ".sh", ".c", ".yaml", ".j2", ".service", ""))


def test_no_links_leave_the_repository() -> None:
    bad = []
    for f in texts() + code():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{f.relative_to(REPO)}:{n}: {line.strip()[:120]}")
    assert not bad, "links out of the repository:\n" + "\n".join(bad)


def test_named_files_exist() -> None:
    missing = []
    for f in texts():
        text = f.read_text(errors="replace")
        names = set(NAMED.findall(text))
        if f.suffix == ".md":
            names |= {t.split("#")[0] for t in MD_LINK.findall(text)
                      if not re.match(r"^[a-z]+:|^#", t)}
        for name in sorted(names):
            if not name or any(c in name for c in "*<>{}$"):
                continue
            candidates = [REPO / name, f.parent / name]
            if not any(c.exists() for c in candidates):
                missing.append(f"{f.relative_to(REPO)}: {name}")
    assert not missing, "named files that do not exist:\n" + "\n".join(missing)
