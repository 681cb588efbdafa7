"""The study: one module per notebook (`NN_name.ipynb` ↔ `cfmoe.stages.name`), each computing its results
into `results/NN_name/` and drawing its figures from them.

    python -m cfmoe.stages base_model --preset gpu       # a notebook's stage without Jupyter

Every stage module has `NOTEBOOK` (its results folder) and `compute(cfg, force=False)`, which computes the
tables, draws the figures from them (`figures`) and writes them all as one set (`runs.one_result_set`): a
failed or killed stage leaves the previous set whole. `force=True` re-records traces and rebuilds models. Models and routing traces come from `cfmoe.stages.runs`; paper numbers, targets
and verdicts from `cfmoe.claims`.
"""

from __future__ import annotations

from . import base_model, beyond_cfmoe, cache_management, ecr_wikitext, fine_tuning, router_design, serving

# stage name -> module, in chain order (notebook NN)
STAGES = {module.NOTEBOOK.split("_", 1)[1]: module
          for module in (base_model, router_design, fine_tuning, cache_management, ecr_wikitext, serving,
                         beyond_cfmoe)}
