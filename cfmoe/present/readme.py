"""The README's measured numbers, generated from the committed tables: every block between
`<!-- NAME:start -->` and `<!-- NAME:end -->` is rewritten by `python -m cfmoe.present.report`, and a test checks
that the README holds exactly what the tables give (and no measured percentage or ratio outside the blocks).

    text = update(readme_text, results_root())
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .. import claims
from ..config import results_subdir

PRESETS = ("cpu", "gpu")


def _read(root: Path, notebook: str, preset: str, name: str) -> pd.Series | None:
    path = root / results_subdir(notebook, preset) / f"{name}.csv"
    return pd.read_csv(path).iloc[0] if path.is_file() else None


def _choice(root: Path, preset: str) -> dict | None:
    path = root / results_subdir("01_router_design", preset) / "choice.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _num(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:{spec}}"


def _model_column(root: Path, preset: str) -> dict[str, str]:
    b = _read(root, "00_base_model", preset, "base_model")
    if b is None:
        return {}
    cells = {
        "model": f"{b.architecture}, {b.parameters / 1e6:.1f}M params, {int(b.moe_layers)} MoE layers",
        "geometry": f"{int(b.n_experts)} routed + shared expert, top-{int(b.top_k)}, k/E = {b.k_over_E:.3f}",
        "bytes": f"{b.routed_expert_share:.1%}",
        "pretraining": (f"{int(b.train_steps)} steps, {b.epochs:.1f} epochs, {b.train_seconds:,.0f} s; last tenth "
                        f"gained {_num(b.get('last_tenth_gain'), '.2%')} held-out loss"),
        "ppl": f"{b.test_perplexity:.1f}",
        "load": f"{b.max_expert_load_ratio:.2f}× ({'met' if claims.MAX_LOAD_RATIO.met(b.max_expert_load_ratio) else 'missed'}: "
                f"≤ {claims.MAX_LOAD_RATIO.bound:g}×)",
        "ecr": (f"{b.test_ecr:.3f} = {b.test_ecr / b.k_over_E:.2f}× k/E "
                f"({'met' if claims.STANDIN_LOCALITY.met(b.test_ecr / b.k_over_E) else 'missed'}: "
                f"≥ {claims.STANDIN_LOCALITY.bound:g}×)"),
    }
    choice = _choice(root, preset)
    if choice:
        cells["loss"] = (f"{choice['kind']}, weight {choice['weight']:.3g}, selected on "
                         f"{choice.get('selected_on', 'the test split (before held-out selection)')}")
    return cells


MODEL_ROWS = {"model": "model", "geometry": "routing geometry", "bytes": "routed experts' share of bytes",
              "pretraining": "pre-training", "ppl": "WikiText-2 test perplexity (own BPE tokens)",
              "load": "busiest expert / uniform share (worst layer)",
              "ecr": "base-model test ECR (teacher-forced)", "loss": "locality loss (notebook 01)"}


def models_block(root: Path) -> list[str]:
    """The table of the models behind the headline numbers, cpu and gpu presets beside the paper's model."""
    real = claims.REAL_ROUTING
    paper = {"model": f"{claims.PAPER_MODEL}, dense + {claims.DEEPSEEK_MOE_16B['n_layers'] - 1} MoE layers",
             "geometry": (f"{claims.DEEPSEEK_MOE_16B['n_routed']} routed + {claims.DEEPSEEK_MOE_16B['n_shared']} shared, "
                          f"top-{claims.DEEPSEEK_MOE_16B['top_k']}"),
             "load": "balanced (its balance-loss weight is small)",
             "ecr": (f"{claims.PAPER_ECR_BASELINE / (claims.DEEPSEEK_MOE_16B['top_k'] / claims.DEEPSEEK_MOE_16B['n_routed']):.2f}× "
                     f"k/E on generated text; real {real['model']} routing {real['ecr_over_k_over_e']:.2f}×"),
             "loss": "L2 / symmetric KL / JS variants"}
    columns = {preset: _model_column(root, preset) for preset in PRESETS}
    lines = ["| | cpu preset | gpu preset | paper |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {columns['cpu'].get(key, '—')} | {columns['gpu'].get(key, '—')} | {paper.get(key, '—')} |"
              for key, label in MODEL_ROWS.items()]
    return lines


def times_block(root: Path) -> list[str]:
    """The cpu chain's measured stage times (`results/chain/cpu.csv`, written by run_all.sh)."""
    path = root / "chain" / "cpu.csv"
    if not path.is_file():
        return ["(the cpu chain has not been timed yet)"]
    times = pd.read_csv(path)
    stages = ", ".join(f"{row.notebook[:2]} {row.seconds / 60:.1f}" for row in times.itertuples())
    lines = [f"`./run_all.sh` (cpu preset) took {times.seconds.sum() / 60:.1f} min on {int(times.cores.max())} "
             f"CPU cores in its last run (minutes per notebook: {stages}; `results/chain/cpu.csv`)."]
    base = _read(root, "00_base_model", "cpu", "base_model")
    if base is not None:
        lines.append(f"Of notebook 00's time, pre-training the base model took {base.train_seconds / 60:.0f} min "
                     f"({int(base.train_steps)} steps, {base.train_tokens_per_second:,.0f} tokens/s); a re-run whose "
                     "base model is already built skips it.")
    return lines


BLOCKS = {"models": models_block, "times": times_block}


def update(readme: str, root: Path) -> str:
    """`readme` with every generated block replaced by what the tables give now."""
    for name, make in BLOCKS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if readme.count(start) != 1 or readme.count(end) != 1:
            raise ValueError(f"README.md must hold {start} and {end} once each")
        head, rest = readme.split(start)
        _, tail = rest.split(end)
        readme = "\n".join([head + start, *make(root), end + tail])
    return readme


def outside_blocks(readme: str) -> str:
    """The README's hand-written text: everything outside the generated blocks (and the headline table)."""
    names = [*BLOCKS, "summary"]
    for name in names:
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start in readme and end in readme:
            head, rest = readme.split(start, 1)
            readme = head + rest.split(end, 1)[1]
    return readme
