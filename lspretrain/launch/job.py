"""The callable submitit runs on every task: the trainer in-process, plus requeue on preemption.

Preemption and time limits, step by step:

1. SLURM signals every task with SIGUSR1 (``--signal=USR1@lead`` before the time limit, or
   ``scancel --signal=USR1`` from a preempting scheduler or a test). The launcher exports
   ``SUBMITIT_PREEMPT_SIGNAL=USR1`` so submitit and the trainer agree on that one signal.
2. While the trainer runs, its own handler owns the signal (installed after submitit's): it sets a
   stop flag that is all-reduced, so every rank finishes the same step, saves a complete
   checkpoint in ``run.dir`` and returns "preempted".
3. ``TrainJob`` then decides the same thing on every rank from ``SLURM_RESTART_COUNT``: below
   ``max_requeues``, rank 0 runs ``scontrol requeue`` and every rank exits *without* a result,
   so a waiting ``job.results()`` keeps waiting for the requeued run; at the limit every rank
   raises ``NotRequeued``, which submitit reports as the job's error.
4. The requeued job runs this same pickle again; the trainer resumes from the newest complete
   checkpoint in ``run.dir``.

A signal that lands outside the trainer's loop (imports, start-up) reaches submitit's handler,
which calls ``checkpoint()``: resubmitting ``self`` unchanged is right, because the state that
matters is already on disk in ``run.dir``.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import submitit

__all__ = ["TrainJob", "NotRequeued"]

TORCHRUN_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class NotRequeued(RuntimeError):
    """Stopped by a signal and not requeued (limit reached, no SLURM, job cancelled); the run
    directory holds the checkpoint."""


@dataclass(frozen=True)
class TrainJob:
    argv: tuple[str, ...]
    max_requeues: int

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            _export_local_dist_env(env)
        else:
            # sbatch copies the submitter's environment: torchrun variables from there would
            # override the ranks SLURM gives this task.
            for key in TORCHRUN_RANK_VARS:
                os.environ.pop(key, None)
        code, preempted = run_trainer(list(self.argv))
        if not preempted:
            if code != 0:
                raise RuntimeError(f"trainer exited with code {code}: {self.argv!r}")
            return code
        resume = "run the same command again to resume from the checkpoint in the run directory"
        if "SLURM_JOB_ID" not in os.environ:
            raise NotRequeued(f"stopped by a signal outside SLURM, where nothing requeues; {resume}")
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            raise NotRequeued(f"stopped by a signal after {restarts} requeue(s) (limit {self.max_requeues}); {resume}")
        if env.global_rank == 0:
            requeue = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=60)
            if requeue.returncode != 0:  # e.g. the job was cancelled: its SIGTERM stopped the trainer
                raise NotRequeued(f"scontrol requeue {env.job_id} failed: {requeue.stderr.strip()}; {resume}")
            print(f"requeued job {env.job_id} (requeue {restarts + 1} of {self.max_requeues})", flush=True)
        # SystemExit is not an Exception: submitit writes no result, the client keeps waiting.
        sys.exit(0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)


def run_trainer(argv: list[str]) -> tuple[int, bool]:
    """The trainer in this process: (exit code, whether it stopped on a signal)."""
    from lspretrain import train

    code = train.main(argv)
    return code, code == train.EXIT_PREEMPTED


def _export_local_dist_env(env: submitit.JobEnvironment) -> None:
    """submitit's local executor only sets SUBMITIT_LOCAL_*; give the trainer torchrun's variables."""
    os.environ.update(
        RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes), MASTER_ADDR="127.0.0.1",
        # Same on every task (the job id is), different between concurrent local jobs.
        MASTER_PORT=str(random.Random(env.job_id).randint(20000, 59999)),
    )
