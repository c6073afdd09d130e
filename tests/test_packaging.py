"""What `pip install .` ships: every data file the code reads at run time (templates,
catalogs, the stylesheet, migrations) is declared in pyproject.toml's package-data, so
`./scripts/serve` (an installed copy, not the work tree) finds it."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _declared() -> dict[str, list[str]]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    declared: dict[str, list[str]] = data["tool"]["setuptools"]["package-data"]
    return declared


def test_every_data_file_is_shipped() -> None:
    declared = _declared()
    missing = []
    checked = 0
    for package, patterns in declared.items():
        root = REPO / package.replace(".", "/")
        for path in root.rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc"):
                continue
            checked += 1
            rel = path.relative_to(root).as_posix()
            # setuptools globs do not cross directories: "templates/*.html" is one level
            if not any(fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns):
                missing.append(f"{package}: {rel}")
    assert checked > 20, "the walk found no data files"
    assert missing == []


def test_the_web_pages_data_is_declared() -> None:
    assert "engine.web" in _declared() and "migrations" in _declared()
