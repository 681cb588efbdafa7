"""Notebook helpers for the papermill chain: name the cell that failed; record each stage's time.

    python -m cfmoe.present.notebooks failed-cell results/executed/cpu/.00_base_model.partial.ipynb
    python -m cfmoe.present.notebooks record-time cpu 00_base_model 812
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


def chain_times_path(tag: str) -> Path:
    """The committed table of the chain's stage times for one preset tag (`results/chain/<tag>.csv`)."""
    from ..config import results_root

    return results_root() / "chain" / f"{tag}.csv"


def record_time(tag: str, notebook: str, seconds: float) -> Path:
    """Replace `notebook`'s row of the chain-times table (wall seconds of its last run, the machine's cores)."""
    import os

    import pandas as pd

    from ..provenance import atomic_path

    path = chain_times_path(tag)
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["notebook", "seconds", "cores"])
    table = table[table.notebook != notebook]
    row = pd.DataFrame([{"notebook": notebook, "seconds": float(seconds), "cores": os.cpu_count()}])
    table = pd.concat([table, row] if len(table) else [row], ignore_index=True).sort_values("notebook")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def publish(executed: str | Path, dest: str | Path) -> list[Path]:
    """Copy the chain's executed notebooks (outputs and figures kept) to `dest` for readers, with this machine's
    paths stripped: the repository's absolute path becomes '.', the home directory '~'; papermill's
    per-cell timings are dropped."""
    import os

    from ..config import ROOT
    from ..provenance import atomic_path

    written = []
    Path(dest).mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(executed).glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text())
        for cell in nb.get("cells", []):
            cell.get("metadata", {}).pop("papermill", None)
            cell.get("metadata", {}).pop("execution", None)
        nb.get("metadata", {}).pop("papermill", None)
        text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        text = text.replace(str(ROOT), ".").replace(os.path.expanduser("~"), "~")
        with atomic_path(Path(dest) / path.name) as tmp:
            tmp.write_text(text)
        written.append(Path(dest) / path.name)
    return written


USAGE = ("usage: python -m cfmoe.present.notebooks failed-cell NOTEBOOK.ipynb | "
         "record-time TAG NOTEBOOK SECONDS | publish EXECUTED_DIR DEST_DIR")


@user_errors("python -m cfmoe.present.notebooks")
def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "failed-cell":
        print(failed_cell(argv[1]))
    elif len(argv) == 4 and argv[0] == "record-time":
        record_time(argv[1], argv[2], float(argv[3]))
    elif len(argv) == 3 and argv[0] == "publish":
        publish(argv[1], argv[2])
    else:
        raise ValueError(USAGE)


if __name__ == "__main__":
    main(sys.argv[1:])
