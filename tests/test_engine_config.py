"""Config validation and launcher-environment parsing (no training)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from engine_helpers import ROOT, tiny_recipe
from lspretrain.engine.config import ConfigError, load_config, save_config
from lspretrain.engine.dist import dist_env_from, first_host

RECIPE = ROOT / "recipes" / "tiny" / "classification_single.yaml"


def test_recipe_and_overrides_typed():
    cfg = load_config(RECIPE, ["optim.lr=0.5", "strategy.name=fsdp2", "model.overrides.depth=3", "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 0.5 and cfg.strategy.name == "fsdp2"
    assert cfg.model.overrides["depth"] == 3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.method.num_classes == 10 and type(cfg.method).__name__ == "ClassificationConfig"


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1", "'optim.lrr'; did you mean optim.lr?"),
    ("chekpoint.every=3", "'chekpoint'; did you mean checkpoint?"),
    ("method.label_smothing=0.1", "did you mean method.label_smoothing?"),
    ("strategy.fsdp.reshard=1", "did you mean strategy.fsdp.reshard_after_forward?"),
    ("data.shardz=x", "did you mean data.shards"),
])
def test_unknown_key_named_with_suggestion(override, expected):
    with pytest.raises(ConfigError, match="unknown config key") as err:
        load_config(RECIPE, [override])
    assert expected in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("optim.lr=abc", "optim.lr"), ("run.total_steps=1.5", "run.total_steps"),
    ("strategy.name=fsdp", "strategy.name"), ("checkpoint.async_save=maybe", "checkpoint.async_save"),
])
def test_wrong_type_refused(override, key):
    with pytest.raises(ConfigError, match=f"bad value for config key '{key}'"):
        load_config(RECIPE, [override])


def test_strategy_names_are_the_registry_s():
    from lspretrain.engine.strategy_registry import STRATEGIES

    assert [load_config(RECIPE, [f"strategy.name={name}"]).strategy.name for name in STRATEGIES] == list(STRATEGIES)
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, ["strategy.name=fsdp"])
    assert str(err.value) == ("bad value for config key 'strategy.name': 'fsdp' is not one of single, ddp, fsdp2, "
                              "deepspeed; did you mean fsdp2?")


def test_cross_section_rules():
    with pytest.raises(ConfigError, match="embed_dimm.*did you mean.*embed_dim"):
        load_config(RECIPE, ["model.overrides.embed_dimm=8"])
    with pytest.raises(ConfigError, match="LayerScale"):
        load_config(RECIPE, ["model.overrides.layerscale_init=null"])
    with pytest.raises(ConfigError, match="unknown method.name 'clasification'.*classification"):
        load_config(RECIPE, ["method.name=clasification"])
    with pytest.raises(ConfigError, match="required config key 'optim'"):
        load_config({"run": {"total_steps": 3}})
    with pytest.raises(ConfigError, match="needs a `data` section"):
        load_config(RECIPE, ["data_source=webdataset"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(tiny_recipe(tmp_path / "r"), ["optim.lr=0.25"])
    save_config(cfg, tmp_path / "config.yaml")
    assert OmegaConf.load(tmp_path / "config.yaml").optim.lr == 0.25
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_cli_refuses_before_any_work(tmp_path):
    run_dir = tmp_path / "never"
    p = subprocess.run([sys.executable, "-m", "lspretrain.train", str(RECIPE), f"run.dir={run_dir}", "optim.lrr=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2
    assert "unknown config key 'optim.lrr'; did you mean optim.lr?" in p.stderr
    assert not run_dir.exists()


def test_dist_env_torchrun_slurm_single():
    env = dist_env_from({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (3, 8, 1, "h", 1234, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "sim-node[7-9,12]"}
    env = dist_env_from(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 6, 2, "slurm")
    assert env.master_addr == "127.0.0.1"  # sim-node7 does not resolve
    assert env.master_port == 20000 + 123456 % 20000
    assert dist_env_from({**slurm, "SLURM_JOB_NODELIST": "localhost"}).master_addr == "localhost"
    assert dist_env_from({}).source == "single" and not dist_env_from({}).distributed


@pytest.mark.parametrize("nodelist, host", [("n1", "n1"), ("n[3-5,9],m1", "n3"), ("gpu-[01-04]", "gpu-01"), ("a,b", "a")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host
