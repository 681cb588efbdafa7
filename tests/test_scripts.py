import json
import subprocess
from pathlib import Path

import pytest

from cfmoe.present.notebooks import failed_cell

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args, message", [
    (["--preset", "laptop"], "unknown preset 'laptop'; valid presets are smoke, cpu, gpu or a .yaml file"),
    (["--preset", "missing.yaml"], "preset file 'missing.yaml' does not exist"),
    (["--fast"], "unknown argument '--fast'; valid: --preset NAME, --model PATH, --force"),
])
def test_run_all_rejects_bad_arguments_before_doing_anything(args, message):
    proc = subprocess.run([str(ROOT / "run_all.sh"), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr


def test_failed_cell_names_the_cell_papermill_marked(tmp_path):
    nb = {"cells": [
        {"cell_type": "code", "source": ["x = 1\n"], "metadata": {"papermill": {"status": "completed"}}},
        {"cell_type": "code", "source": ["results = base_model.compute(cfg)\n", "more\n"],
         "metadata": {"papermill": {"exception": True, "status": "failed"}}},
    ]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert failed_cell(path) == "cell 2: results = base_model.compute(cfg)"
    path.write_text(json.dumps({"cells": []}))
    assert failed_cell(path) == "no failed cell recorded"
