"""Notebook helpers for the papermill chain: name the cell that failed.

    python -m cfmoe.present.notebooks failed-cell results/executed/cpu/.00_base_model.partial.ipynb
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def failed_cell(path: str | Path) -> str:
    """'cell N: <first line>' of the cell papermill marked as failed, or 'no failed cell recorded'."""
    nb = json.loads(Path(path).read_text())
    for number, cell in enumerate(nb.get("cells", []), start=1):
        meta = cell.get("metadata", {}).get("papermill", {})
        if meta.get("exception") or meta.get("status") == "failed":
            source = "".join(cell.get("source", "")).strip().splitlines()
            return f"cell {number}: {source[0] if source else '(empty)'}"
    return "no failed cell recorded"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "failed-cell":
        sys.exit("usage: python -m cfmoe.present.notebooks failed-cell NOTEBOOK.ipynb")
    print(failed_cell(sys.argv[2]))
