"""Entry point: ``python -m lspretrain.train RECIPE.yaml [key=value ...]`` (``lspretrain-train``).

Runs alone, under ``torchrun`` or under ``srun`` (see ``lspretrain.engine.dist``). Exit codes:
0 completed, 2 config refused, 3 aborted (too many non-finite steps), 75 preempted (SIGTERM /
SIGUSR1: a checkpoint was saved; requeue the job to resume). ``RUN/result.json`` says the same.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_CONFIG, EXIT_ABORTED, EXIT_PREEMPTED = 0, 2, 3, 75


def build(cfg):
    """Config -> (trainer, env): process group, method, strategy, data, in that order."""
    import torch

    from .engine.dist import init_distributed
    from .engine.strategies import build_strategy
    from .engine.trainer import Trainer
    from .methods import build_method

    env, device = init_distributed(cfg.run.device, need_group=cfg.strategy.name != "single")
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank and world size
    method = build_method(cfg.method, cfg.model)
    strategy = build_strategy(cfg.strategy, env, device)
    loader = method.build_loader(cfg, env.rank, env.world_size)
    return Trainer(cfg, method, strategy, loader), env


def run(cfg) -> int:
    from .engine.dist import shutdown
    from .engine.fault import NonFiniteAbort

    trainer, env = build(cfg)
    try:
        result = trainer.fit()
        code = EXIT_PREEMPTED if result.status == "preempted" else EXIT_OK
        summary = {"status": result.status, "step": result.step, "checkpoint": result.checkpoint,
                   "skipped_steps": result.skipped_steps, "reason": result.reason}
    except NonFiniteAbort as err:
        logging.getLogger("lspretrain").error("%s", err)
        code, summary = EXIT_ABORTED, {"status": "aborted", "step": trainer.step, "error": str(err),
                                       "checkpoint": str(trainer.ckpt.latest() or "") or None}
    if env.rank == 0:
        Path(cfg.run.dir, "result.json").write_text(json.dumps(summary, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    # DeepSpeed processes tend to abort in their C++ teardown: leave right after the barrier.
    shutdown(code if cfg.strategy.name == "deepspeed" else None)
    return code


def main(argv: list[str] | None = None) -> int:
    from .engine.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="lspretrain-train", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="YAML recipe (recipes/...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 run.dir=runs/x")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"lspretrain-train: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return run(cfg)


if __name__ == "__main__":  # the guard DCP's process-based async checkpointer needs
    sys.exit(main())
