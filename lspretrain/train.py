"""Entry point: ``python -m lspretrain.train RECIPE.yaml [key=value ...]`` (``lspretrain-train``).

Runs alone, under ``torchrun`` or under ``srun`` (see ``lspretrain.engine.dist``). Exit codes:
0 completed, 2 config refused (nothing started), 3 aborted (too many non-finite steps),
4 bad data (more than ``data.max_bad_fraction`` of the samples were bad), 75 preempted
(SIGTERM / SIGUSR1 / Ctrl-C: a checkpoint was saved; run the same command, or requeue the
job, to resume), 130 interrupted (a second Ctrl-C abandoned the step; the last checkpoint is
kept). ``RUN/result.json`` says the same.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_CONFIG, EXIT_ABORTED, EXIT_BAD_DATA, EXIT_PREEMPTED, EXIT_INTERRUPTED = 0, 2, 3, 4, 75, 130


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
    method = build_method(cfg.method, cfg.model, cfg.run.total_steps)
    strategy = build_strategy(cfg.strategy, env, device)
    loader = method.build_loader(cfg.training_data, cfg.run.device, env.rank, env.world_size)
    return Trainer(cfg, method, strategy, loader), env


def run(cfg) -> int:
    from .data import BadDataError
    from .engine.dist import shutdown
    from .engine.fault import NonFiniteAbort

    log = logging.getLogger("lspretrain")
    try:
        trainer, env = build(cfg)
    except ValueError as err:  # what the method's set-up refuses (method.init_from: a file that does not fit)
        log.debug("refused while building the run", exc_info=True)
        print(f"lspretrain-train: {err}", file=sys.stderr)
        return EXIT_CONFIG

    def failed(status: str, error: str) -> dict:
        return {"status": status, "step": trainer.step, "error": error,
                "checkpoint": str(trainer.ckpt.dir.newest() or "") or None}

    try:
        result = trainer.fit()
        code = EXIT_PREEMPTED if result.status == "preempted" else EXIT_OK
        summary = {"status": result.status, "step": result.step, "checkpoint": result.checkpoint,
                   "skipped_steps": result.skipped_steps, "reason": result.reason}
        if result.status == "preempted" and env.rank == 0:
            print(f"stopped at step {result.step} ({result.reason}); run the same command again to resume", flush=True)
    except NonFiniteAbort as err:
        log.error("%s", err)
        code, summary = EXIT_ABORTED, failed("aborted", str(err))
    except BadDataError as err:
        log.error("%s", err)
        code, summary = EXIT_BAD_DATA, failed("bad_data", str(err))
        if env.rank == 0:
            print(f"lspretrain-train: stopped on bad data: {err.summary} (the last checkpoint is kept)", file=sys.stderr)
    except KeyboardInterrupt:
        code, summary = EXIT_INTERRUPTED, failed("interrupted", "a second Ctrl-C abandoned the step")
        if env.rank == 0:
            latest = summary["checkpoint"]
            print(f"interrupted at step {trainer.step}; " + (f"run the same command again to resume from {latest}"
                                                              if latest else "no checkpoint was saved yet"),
                  file=sys.stderr)
    if env.rank == 0:
        Path(cfg.run.dir, "result.json").write_text(json.dumps(summary, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    # DeepSpeed processes tend to abort in their C++ teardown: leave right after the barrier.
    shutdown(code if cfg.strategy.name == "deepspeed" else None)
    return code


def main(argv: list[str] | None = None) -> int:
    from .engine.config import ConfigError, check_data_exists, load_config

    parser = argparse.ArgumentParser(prog="lspretrain-train", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="YAML recipe (recipes/...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 run.dir=runs/x")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.recipe, args.overrides)
        check_data_exists(cfg)
    except ConfigError as err:
        print(f"lspretrain-train: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return run(cfg)


if __name__ == "__main__":  # the guard DCP's process-based async checkpointer needs
    sys.exit(main())
