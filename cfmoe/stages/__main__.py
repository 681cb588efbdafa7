"""`python -m cfmoe.stages STAGE [--preset P] [--model-path PATH] [--seed N] [--force]`: one notebook's stage."""

from __future__ import annotations

import argparse

from ..config import load_config
from . import STAGES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cfmoe.stages", description=__doc__.split(":")[1].strip())
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--model-path", default="")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="re-record traces and rebuild models")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, model_path=args.model_path or None, seed=args.seed)
    stage = STAGES[args.stage]
    stage.figures(cfg, stage.compute(cfg, force=args.force))
    print(f"stage {args.stage} ({cfg.preset}) written to {cfg.results_dir(stage.NOTEBOOK)}")


if __name__ == "__main__":
    main()
