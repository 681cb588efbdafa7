"""`python -m cfmoe.stages STAGE [--preset P] [--model-path PATH] [--seed N] [--force]`: one notebook's stage.
`python -m cfmoe.stages check [--preset P] [--model-path PATH]` validates the preset (and the model) only."""

from __future__ import annotations

import argparse

from .. import model
from ..cli import user_errors
from ..config import load_config

PROG = "python -m cfmoe.stages"


@user_errors(PROG)
def main(argv=None) -> None:
    from . import STAGES

    parser = argparse.ArgumentParser(prog=PROG, description="Run one notebook's stage without Jupyter.")
    parser.add_argument("stage", choices=["check", *STAGES])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--model-path", default="")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="re-record traces and rebuild models")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, model_path=args.model_path or None, seed=args.seed)
    if args.stage == "check":
        if cfg.model_path:
            model.check_model_path(cfg.model_path)
        print(f"preset {cfg.preset!r} is valid" + (f"; model {cfg.model_path!r} is an MoE causal LM" if cfg.model_path else ""))
        return
    stage = STAGES[args.stage]
    stage.compute(cfg, force=args.force)
    print(f"stage {args.stage} ({cfg.preset}) written to {cfg.results_dir(stage.NOTEBOOK)}")


if __name__ == "__main__":
    main()
