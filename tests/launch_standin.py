"""A stand-in trainer for the requeue mechanics (tests only; imported in SLURM jobs via PYTHONPATH).

Same contract as ``lspretrain.train`` where it matters here: ``run.dir=`` in argv, resume from the
newest checkpoint there, SIGUSR1/SIGTERM -> finish the step, save, report "preempted".
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def run(argv: list[str]) -> tuple[int, bool]:
    opts = dict(a.split("=", 1) for a in argv[1:])
    run_dir, total, step_s = Path(opts["run.dir"]), int(opts.get("steps", 40)), float(opts.get("step_s", 0.25))
    stop: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    rank = os.environ.get("SLURM_PROCID", "0")
    ckpt = run_dir / f"ckpt-rank{rank}.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "loss": 0.0}
    print(f"start step={state['step']} restarts={os.environ.get('SLURM_RESTART_COUNT', 0)}", flush=True)
    while state["step"] < total:
        time.sleep(step_s)
        state = {"step": state["step"] + 1, "loss": state["loss"] * 0.9 + 1.0 / (state["step"] + 1)}
        if stop or state["step"] % 5 == 0:
            ckpt.write_text(json.dumps(state))
        if stop:
            print(f"preempted step={state['step']}", flush=True)
            return 0, True
    ckpt.write_text(json.dumps(state))
    (run_dir / f"final-rank{rank}.json").write_text(json.dumps({**state, "argv": argv}))
    return 0, False
