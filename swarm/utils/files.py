"""Small file helpers."""

from __future__ import annotations

from pathlib import Path


def write_lines_atomically(path: str | Path, lines: list[str]) -> None:
    """Write a file that readers never see half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(path)
