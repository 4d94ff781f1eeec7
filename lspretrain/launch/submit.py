"""``launchers/submit.py``: submit a training run to SLURM (or run it locally) through submitit."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import submitit

from .job import TrainJob
from .site import SiteConfigError, SiteDefaults, load_site_defaults
from .spec import (
    ClusterUnreachable, LaunchError, LaunchSpec, SlurmOptions, check_partition, check_run_name, sbatch_parameters,
    sbatch_script, submitit_folder,
)

__all__ = ["build_spec", "main", "parse_args", "submit"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="submit.py", description="Submit lspretrain training through submitit (SLURM, or --local).",
        epilog="Unset options fall back to the site file ($LSPRETRAIN_SITE_CONFIG or "
        "~/.config/lspretrain/site.yaml); see docs/LAUNCH.md.",
    )
    p.add_argument("recipe", type=Path, help="training recipe (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides passed to the trainer")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="also the tasks per node (1 task when 0)")
    for name in ("partition", "account", "qos", "constraint", "exclude"):
        p.add_argument(f"--{name}")
    for name in ("timeout-min", "mem-gb", "cpus-per-task", "max-requeues"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--run-dir", type=Path, help="run directory (default: <site run_root>/<name>)")
    p.add_argument("--name", help="job and run name (default: the recipe's file name)")
    p.add_argument("--local", action="store_true", help="run on this machine with submitit's local executor")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and sbatch script only")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the flags


def build_spec(args: argparse.Namespace, site: SiteDefaults) -> LaunchSpec:
    name = args.name or args.recipe.stem

    def pick(key: str):  # the flag when given, else the site default (signal_lead_s has no flag)
        value = getattr(args, key, None)
        return getattr(site, key) if value is None else value

    return LaunchSpec(
        recipe=args.recipe.resolve(),
        run_dir=(args.run_dir or Path(site.run_root) / check_run_name(name)).resolve(),
        name=name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        overrides=tuple(args.overrides),
        **{f.name: pick(f.name) for f in fields(SlurmOptions)},
        sbatch_extra=dict(site.sbatch),
        setup=tuple(site.setup),
        local=args.local,
    )


def resolved_config(spec: LaunchSpec) -> str:
    """The trainer's config after overrides, as YAML; refused here rather than on the cluster."""
    from omegaconf import OmegaConf

    from ..engine.config import ConfigError, load_config

    try:
        cfg = load_config(spec.recipe, list(spec.trainer_argv()[1:]))
    except ConfigError as err:
        raise LaunchError(str(err)) from None
    tasks = spec.nodes * spec.tasks_per_node
    if tasks > 1 and cfg.strategy.name == "single":
        # Every task would train its own copy into the same run directory.
        raise LaunchError(f"strategy.name=single cannot use {tasks} tasks; override strategy.name=ddp (or fsdp2, "
                          "deepspeed)")
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def submit(spec: LaunchSpec) -> submitit.Job:
    """Submit ``spec`` and return the submitit job (its ``results()`` wait through requeues)."""
    # SlurmExecutor directly (what AutoExecutor(cluster="slurm") wraps) so that --dry-run renders
    # the same parameters through the same function without needing srun on this machine.
    folder = submitit_folder(spec)
    job = TrainJob(tuple(spec.trainer_argv()), spec.max_requeues)
    executor: submitit.core.core.Executor
    if spec.local:
        executor = submitit.LocalExecutor(folder, max_num_timeout=spec.max_requeues)
        executor.update_parameters(timeout_min=spec.timeout_min, nodes=spec.nodes,
                                   tasks_per_node=spec.tasks_per_node, gpus_per_node=spec.gpus_per_node)
    else:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=spec.max_requeues)
        executor.update_parameters(**sbatch_parameters(spec))
    return executor.submit(job)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = build_spec(args, load_site_defaults())
        spec.validate()
        if not spec.local:
            try:
                check_partition(spec.partition)
            except ClusterUnreachable as err:
                if not args.dry_run:
                    raise LaunchError(f"{err}: nothing submitted (--dry-run prints the script without a cluster)")
                print(f"warning: {err}: partition {spec.partition!r} not checked; the script is printed anyway",
                      file=sys.stderr)
        config = resolved_config(spec)
    except (LaunchError, SiteConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"# trainer: {spec.trainer_command()}\n# resolved config\n{config}")
        if spec.local:
            print(f"# local run: {spec.nodes} node(s) x {spec.tasks_per_node} task(s), logs in {submitit_folder(spec)}")
        else:
            print(f"# sbatch script\n{sbatch_script(spec)}")
        return 0
    job = submit(spec)
    print(f"submitted job {job.job_id} ({spec.name}); run dir {spec.run_dir}; logs {submitit_folder(spec)}")
    if spec.local:  # the tasks are children of this process: stay with them
        job.results()
        print(f"local job {job.job_id} finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
