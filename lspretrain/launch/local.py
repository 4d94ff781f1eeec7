"""``launchers/train_local.sh``: the trainer on one machine under torchrun, exiting with the run's code.

torchrun treats any non-zero worker exit as a failure: after a preemption every worker exits 75
(checkpoint saved), yet torchrun prints a ``ChildFailedError`` report and exits 1. This wrapper
runs torchrun and, when torchrun fails, exits with the code of the status the run wrote into
``RUN/result.json`` during this attempt (75 preempted, 3 aborted, 4 bad data, 130 interrupted;
anything else keeps torchrun's code).

Signals: torchrun runs in its own session, so a stop request reaches it exactly once, from here
(in a terminal, Ctrl-C would otherwise reach the workers twice: directly and through torchrun,
and a second Ctrl-C abandons the step). The first SIGINT (Ctrl-C) sent to the wrapper is
forwarded to torchrun as SIGINT, the first SIGTERM, SIGUSR1 or SIGHUP as SIGTERM; torchrun passes
it to the workers, which finish the current step, save a checkpoint and exit 75. torchrun kills
workers that take longer than its shutdown timeout (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s by
default). A second Ctrl-C goes to the workers directly (they abandon the step, exit 130); other
repeated signals are not forwarded: a second signal inside torchrun's shutdown would cut its wait
for the workers short.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..train import EXIT_ABORTED, EXIT_BAD_DATA, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_PREEMPTED

__all__ = ["main"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
EXIT_FOR_STATUS = {"aborted": EXIT_ABORTED, "bad_data": EXIT_BAD_DATA, "preempted": EXIT_PREEMPTED,
                   "interrupted": EXIT_INTERRUPTED}
_PR_SET_PDEATHSIG = 1


def _nproc(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"NPROC must be a positive integer, not {text!r}")
    return int(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_local.sh", usage="%(prog)s NPROC RECIPE.yaml [key=value ...]",
                                description="lspretrain.train under torchrun on this machine (see docs/LAUNCH.md).")
    p.add_argument("nproc", type=_nproc, help="worker processes (one per GPU; gloo on CPU)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, help="RECIPE.yaml [key=value ...], passed unchanged")
    args = p.parse_args(argv)
    if not args.trainer_args:
        p.error("the recipe is missing")
    return args


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's workers), from /proc; none elsewhere."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state: the parent pid
            found.append(int(entry.name))
    return found


def _stop_with_parent() -> None:
    # Runs in the child before exec: if this wrapper is killed outright, torchrun gets SIGTERM
    # (and stops its workers with a checkpoint) instead of training on unattended.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _run_torchrun(cmd: list[str]) -> int:
    # SIGUSR1 sent to torchrun itself (not one of its default signals) would kill it and orphan the
    # workers; handled, it reaches them like SIGTERM does. Older torchrun ignores the variable.
    env = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", **os.environ}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None)
    forwarded: list[str] = []

    def forward(signum, frame):
        name = signal.Signals(signum).name
        if not forwarded:
            forwarded.append(name)
            print(f"train_local.sh: {name}: asking the workers to stop after the current step with a checkpoint"
                  + (" (Ctrl-C again to abandon the step)" if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        elif signum == signal.SIGINT:
            print("train_local.sh: SIGINT again: the workers abandon the step", file=sys.stderr, flush=True)
            for pid in _children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
        else:
            print(f"train_local.sh: {name}: already stopping (after {forwarded[0]}); torchrun kills workers that "
                  "outlast its shutdown timeout", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from ..engine.config import ConfigError, check_data_exists, load_config

    recipe, overrides = args.trainer_args[0], args.trainer_args[1:]
    try:  # the run directory (where result.json will be), and the trainer's refusal before any process starts
        cfg = load_config(recipe, overrides)
        check_data_exists(cfg)
        run_dir = Path(cfg.run.dir)
    except ConfigError as err:
        print(f"train_local.sh: {err}", file=sys.stderr)
        return EXIT_CONFIG
    result = run_dir / "result.json"
    before = _stat(result)
    # --standalone: a private rendezvous on a free local port, so two runs on one machine do not clash.
    code = _run_torchrun([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", str(args.nproc), "-m", "lspretrain.train", *args.trainer_args])
    if code == 0:
        return 0
    if code < 0:  # torchrun itself was killed by a signal: the shell's convention
        code = 128 - code
    if _stat(result) in (None, before):  # nothing written by this attempt (e.g. killed during start-up)
        return code
    summary = json.loads(result.read_text())
    status = summary.get("status")
    if status not in EXIT_FOR_STATUS:
        return code
    mapped = EXIT_FOR_STATUS[status]
    print(f"train_local.sh: the run ended {status!r} at step {summary.get('step')}, newest checkpoint "
          f"{summary.get('checkpoint')}; exit {mapped} instead of torchrun's {code} (its failure report above is "
          "expected)" + ("; run the same command to resume" if status == "preempted" else ""), file=sys.stderr)
    return mapped


if __name__ == "__main__":
    sys.exit(main())
