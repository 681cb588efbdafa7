"""Notebook helpers for the papermill chain: name the cell that failed.

    python -m cfmoe.present.notebooks failed-cell results/executed/cpu/.00_base_model.partial.ipynb
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cli import user_errors


def failed_cell(path: str | Path) -> str:
    """'cell N: <first line>' of the cell papermill marked as failed, or 'no failed cell recorded'."""
    nb = json.loads(Path(path).read_text())
    for number, cell in enumerate(nb.get("cells", []), start=1):
        meta = cell.get("metadata", {}).get("papermill", {})
        if meta.get("exception") or meta.get("status") == "failed":
            source = "".join(cell.get("source", "")).strip().splitlines()
            return f"cell {number}: {source[0] if source else '(empty)'}"
    return "no failed cell recorded"


@user_errors("python -m cfmoe.present.notebooks")
def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "failed-cell":
        raise ValueError("usage: python -m cfmoe.present.notebooks failed-cell NOTEBOOK.ipynb")
    print(failed_cell(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
