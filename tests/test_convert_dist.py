"""Training checkpoints consolidate to the live model's weights: fsdp2/DCP from 2 ranks and
DeepSpeed ZeRO 2 and 3, written by real 2-process gloo runs through the engine's strategies
and CheckpointManager, then read by the converter in one process without a process group."""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from torch import nn

from lspretrain.convert import read_source
from lspretrain.convert.sources import newest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARCH, SPEC = "vit_tiny_patch16", "paper_lora"
OVERRIDES = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, layerscale_init=0.1, num_registers=1)


class _TwoBackbones(nn.Module):
    """The shape of a DINOv2-style method: a trained student, a frozen teacher, a head."""

    def __init__(self):
        super().__init__()
        from lspretrain.models import build_backbone

        self.student = nn.Module()
        self.student.backbone = build_backbone(ARCH, SPEC, **OVERRIDES)
        self.student.head = nn.Linear(32, 4)
        self.teacher = copy.deepcopy(self.student)
        with torch.no_grad():  # a teacher that differs from the student
            for p in self.teacher.parameters():
                p.mul_(0.5)
        self.teacher.requires_grad_(False)

    def sharded_modules(self):
        return [self.student.backbone, self.teacher.backbone]

    def optimized_module(self):
        return self.student

    def num_layers(self):
        return OVERRIDES["depth"]

    def forward(self, batch, step):
        return self.student.head(self.student.backbone(batch["images"])).square().mean(), {}


def _worker(rank, world, port, strategy, stage, run_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from lspretrain.engine.checkpoint import CheckpointManager
    from lspretrain.engine.config import CheckpointConfig, DeepSpeedConfig, StrategyConfig
    from lspretrain.engine.dist import DistEnv
    from lspretrain.engine.optim import OptimConfig
    from lspretrain.engine.strategies import build_strategy

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    method = _TwoBackbones()
    cfg = StrategyConfig(name=strategy, precision="fp32", deepspeed=DeepSpeedConfig(stage=stage))
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, master_port=port, source="torchrun")
    strat = build_strategy(cfg, env, torch.device("cpu"))
    strat.setup(method, OptimConfig(lr=1e-2, weight_decay=0.0), micro_batch=2)
    for step in range(2):  # move the weights (and the LoRA B away from zero)
        batch = strat.prepare_batch({"images": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank + 10 * step))})
        loss, _ = strat.forward(batch, step)
        strat.backward(loss)
        strat.clip_and_step(3.0, skip=False)
    CheckpointManager(run_dir, CheckpointConfig(), strat).save(2, {}, {}, {})
    # The live weights, gathered in full on rank 0.
    if strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(method.parameters()), enabled=stage == 3):
            full = {k: v.detach().clone() for k, v in method.state_dict().items()}
    if rank == 0:
        torch.save(full, Path(run_dir) / "live.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # DeepSpeed may abort in its C++ teardown otherwise


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy,stage", [("fsdp2", 0), ("deepspeed", 2), ("deepspeed", 3)])
def test_training_checkpoint_consolidates_to_live_weights(tmp_path, strategy, stage):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": ARCH, "spec": SPEC, "overrides": OVERRIDES}}))
    mp.start_processes(_worker, args=(2, _free_port(), strategy, stage, str(run)), nprocs=2, start_method="spawn")
    live = torch.load(run / "live.pt", weights_only=True)
    ckpt = newest_checkpoint(run)
    assert ckpt.name == "step_00000002"
    state = ckpt / "state"
    assert (state / ".metadata").is_file() if strategy == "fsdp2" else any(state.glob("zero/*model_states.pt"))

    for which in ("student", "teacher"):
        prefix = f"{which}.backbone."
        want = {k[len(prefix):]: v for k, v in live.items() if k.startswith(prefix)}
        for source in (run, ckpt, state):  # a run, a checkpoint step, the strategy's directory
            bb = read_source(source, which=which)
            assert sorted(bb.state_dict) == sorted(want)
            for k, v in want.items():
                assert torch.equal(bb.state_dict[k], v), (which, k)
        assert bb.spec["lora_rank"] == 32 and bb.vit["embed_dim"] == 32
    # Training moved the LoRA factors: the delta is not zero anymore, the model is specialized.
    assert live["student.backbone.blocks.0.attn.qkv.cls_lora_b"].abs().sum() > 0

    # The CLI: newest checkpoint of the run, teacher by default, to safetensors.
    out = tmp_path / "teacher.safetensors"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), str(run), "--to", "safetensors",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{len(want)} tensors" in done.stdout
    model = read_source(out).build()
    x = torch.randn(2, 3, 32, 32)
    reference = read_source(run, which="teacher").build()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
