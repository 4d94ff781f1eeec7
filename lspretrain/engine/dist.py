"""Process-group set-up from the launcher's environment: torchrun, SLURM, or a single process.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under ``srun`` only the
SLURM task variables exist: the master is the first host of SLURM_JOB_NODELIST (127.0.0.1 when
that name does not resolve, as with simulated nodes) and the port is derived from the job id,
so every task of a job computes the same address without talking to the others.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "dist_env_from", "first_host", "init_distributed", "shutdown"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun" | "slurm" | "local" (1-rank group) | "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.source != "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``n[3-5,9],m1`` -> ``n3``; ``gpu-[01-04]`` -> ``gpu-01``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _resolvable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False


def dist_env_from(environ: dict | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        host = first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or (host if _resolvable(host) else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT") or 20000 + job % 20000),
            source="slurm",
        )
    return DistEnv()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", need_group: bool = False, timeout_s: int = 1800) -> tuple[DistEnv, torch.device]:
    """Join the process group described by the environment and pick this rank's device. NCCL
    on CUDA, gloo on CPU. A plain single process gets a 1-rank group only if ``need_group``
    (fsdp2/ddp/deepspeed need one even alone)."""
    env = dist_env_from()
    if not env.distributed and need_group:
        env = DistEnv(master_port=_free_port(), source="local")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if env.distributed and not dist.is_initialized():
        # torch reads these for the env:// rendezvous; SLURM tasks do not have them yet.
        os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
                          RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s))
    return env, dev


def shutdown(exit_code: int | None = None) -> None:
    """Leave the process group cleanly; with ``exit_code``, end the process right away (DeepSpeed
    processes otherwise tend to abort in their C++ teardown)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if exit_code is not None:
        os._exit(exit_code)
