"""Typed training configuration: dataclass sections, YAML recipes, dotted command-line overrides.

``load_config(recipe, overrides)`` validates everything before any work starts: an unknown key
is refused naming the key and the nearest valid names, a wrong type naming the key and value.
The ``method`` section's schema is chosen by ``method.name`` from the method registry.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from ..data.config import DataConfig
from ..eval.dense import DenseEvalConfig
from ..methods.registry import METHODS
from .optim import OptimConfig
from .strategy_registry import STRATEGIES

__all__ = [
    "RunConfig", "ModelConfig", "FSDPConfig", "DeepSpeedConfig", "StrategyConfig", "CheckpointConfig",
    "FaultConfig", "LogConfig", "EvalConfig", "SyntheticDataConfig", "TrainConfig", "ConfigError", "load_config", "save_config",
    "check_data_exists",
]


class ConfigError(ValueError):
    """A recipe or override the schema refuses."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: config.yaml, checkpoints/, metrics.jsonl, tb/
    seed: int = 0
    total_steps: int = 1000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-repeatable runs)


@dataclass
class ModelConfig:
    arch: str = "vit_small_patch16"
    spec: str = "none"  # specialization preset (lspretrain.models.PRESETS)
    overrides: dict[str, Any] = field(default_factory=dict)  # ViTConfig fields, e.g. img_size


@dataclass
class FSDPConfig:
    replicate_nodes: int = 1  # > 1: hybrid sharding, shard inside a node, replicate across nodes
    reshard_after_forward: bool = True
    reduce_fp32: bool = True  # MixedPrecisionPolicy.reduce_dtype fp32 under bf16 params


@dataclass
class DeepSpeedConfig:
    stage: int = 2  # ZeRO stage 1, 2 or 3
    offload_optimizer: bool = False  # optimizer state + step on the CPU
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the generated config


@dataclass
class StrategyConfig:
    name: str = "single"  # a key of STRATEGIES (engine/strategy_registry.py), checked at load
    # auto: bf16 on CUDA devices and CPUs with native bf16 arithmetic, else fp32 (engine/precision.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    ac_every: int = 2  # selective: checkpoint every n-th block
    compile: bool = False  # torch.compile each block
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between saves; 0: only at the end and on preemption
    every_minutes: float = 0.0  # also save when this much wall time passed since the last save; 0: never
    keep_last: int = 2
    keep_every: int = 0  # also keep every step that is a multiple of this; 0: none
    async_save: bool = False
    resume: bool = True  # resume from the newest complete checkpoint in the run directory
    save_final: bool = True


@dataclass
class FaultConfig:
    max_consecutive_skips: int = 5  # non-finite steps in a row before aborting
    handle_signals: bool = True  # SIGTERM/SIGUSR1/SIGINT -> save and exit "preempted" (main thread only)


@dataclass
class LogConfig:
    every: int = 10
    console_every_s: float = 30.0  # rank 0 also logs when this long passed without a line
    tensorboard: bool = True
    peak_flops: float = 0.0  # per device FLOP/s for MFU; 0: MFU not logged
    # Per-phase times (perf/forward_s, backward, collective, optimizer, ema) on CUDA: synchronizes
    # the device at each phase boundary (costs throughput). Always logged on the CPU.
    phase_times: bool = False


@dataclass
class EvalConfig:
    """Periodic evaluation during training (``Method.evaluate``), logged under ``eval/``.

    ``shards``/``index``: the labelled evaluation split (e.g. validation shards); ``train_shards``
    /``train_index``: labelled training images for methods that need a reference set (k-NN)."""

    every: int = 0  # steps between evaluations; 0: never (the final step is always evaluated when > 0)
    shards: str = ""
    index: Optional[str] = None
    train_shards: str = ""
    train_index: Optional[str] = None
    max_samples: int = 10000  # per split
    batch_size: int = 256
    cache_gib: float = 2.0  # decoded evaluation images kept in memory up to this size per split; streamed above
    # The frozen-backbone linear segmentation probe, logged under eval/dense/ (off while its
    # shards/index are unset; see lspretrain/eval/dense.py)
    dense: DenseEvalConfig = field(default_factory=DenseEvalConfig)


@dataclass
class SyntheticDataConfig:
    """Deterministic in-memory classification data (smoke tests, benchmarks)."""

    batch_size: int = 8  # per rank
    img_size: int = 32
    num_classes: int = 10
    seed: int = 0


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the dataclass registered for method.name (lspretrain/methods/registry.py)
    optim: OptimConfig = MISSING  # optim.lr has no default: every recipe states it
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data_source: Literal["webdataset", "synthetic"] = "webdataset"
    data: Optional[DataConfig] = None
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    @property
    def training_data(self) -> DataConfig | SyntheticDataConfig:
        """The section the training stream reads (``data_source``)."""
        return self.synthetic if self.data_source == "synthetic" else self.data


def _valid_keys(method_type: type, dotted: str) -> list[str]:
    """Field names of the section holding ``dotted`` (from the dataclasses, so sections that
    are unset or None in the schema still get suggestions)."""
    t: Any = TrainConfig
    for i, part in enumerate(dotted.split(".")[:-1]):
        hints = typing.get_type_hints(t) if dataclasses.is_dataclass(t) else {}
        t = method_type if (i == 0 and part == "method") else hints.get(part)
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
            t = args[0]  # Optional[Section]
    return [f.name for f in dataclasses.fields(t)] if dataclasses.is_dataclass(t) else []


def _refuse(err: OmegaConfBaseException, method_type: type, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{source}: required config key {key!r} is not set")
    if isinstance(err, ConfigKeyError):
        valid = _valid_keys(method_type, key)
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
        return ConfigError(f"{source}: unknown config key {key!r}{hint} (valid here: {', '.join(valid)})")
    msg = str(err).split("\n")[0]
    return ConfigError(f"{source}: bad value for config key {key!r}: {msg}")


def _schema(method_name: str) -> tuple[DictConfig, type]:
    if method_name not in METHODS:
        close = difflib.get_close_matches(method_name, METHODS, n=3)
        raise ConfigError(f"unknown method.name {method_name!r}; did you mean {close}? known: {sorted(METHODS)}")
    method_type = METHODS[method_name].config_class
    schema = OmegaConf.structured(TrainConfig)
    schema.method = OmegaConf.structured(method_type)
    return schema, method_type


def load_config(recipe: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Recipe (YAML path or dict) + ``key=value`` overrides -> a validated ``TrainConfig``."""
    layers: list[tuple[str, DictConfig]] = []
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        layers.append((str(path), OmegaConf.load(path)))
    elif recipe is not None:
        layers.append(("recipe", OmegaConf.create(recipe)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    name = "classification"
    for _, layer in layers:
        name = OmegaConf.select(layer, "method.name", default=name)
    schema, method_type = _schema(name)
    merged = schema
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _refuse(err, method_type, source) from None
    try:
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _refuse(err, method_type, "config") from None
    except ValueError as err:  # a section's __post_init__
        raise ConfigError(f"config: {err}") from None
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    """Cross-section rules the types cannot express, and names the registries must know."""
    import torch

    from ..models import build_backbone

    _check_registered("strategy.name", cfg.strategy.name, STRATEGIES)
    try:
        with torch.device("meta"):  # the whole backbone, no memory: arch, overrides and spec agree
            build_backbone(cfg.model.arch, cfg.model.spec, **cfg.model.overrides)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    if cfg.data_source == "webdataset" and cfg.data is None:
        raise ConfigError("data_source=webdataset needs a `data` section (data.shards at least)")
    try:
        cfg.method.check_strategy(cfg.strategy.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.strategy.deepspeed.stage not in (1, 2, 3):
        raise ConfigError(f"strategy.deepspeed.stage={cfg.strategy.deepspeed.stage}: expected 1, 2 or 3")
    if cfg.run.total_steps < 1:
        raise ConfigError(f"run.total_steps={cfg.run.total_steps}: must be >= 1")
    if cfg.optim.warmup_steps > cfg.run.total_steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds run.total_steps={cfg.run.total_steps}")
    if cfg.eval.every and not (cfg.eval.shards or cfg.eval.index or cfg.eval.dense.enabled):
        raise ConfigError(f"eval.every={cfg.eval.every} needs eval.shards or eval.index (the labelled evaluation split) "
                          f"or eval.dense.shards/index (the segmentation probe)")
    if cfg.eval.dense.enabled:
        try:
            cfg.eval.dense.check()
        except ValueError as err:
            raise ConfigError(f"eval.dense: {err}") from None
    if cfg.checkpoint.every_minutes < 0:
        raise ConfigError(f"checkpoint.every_minutes={cfg.checkpoint.every_minutes}: must be >= 0")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last}: must be >= 1")


def _check_registered(key: str, value: str, registry: dict) -> None:
    if value not in registry:
        close = difflib.get_close_matches(value, registry, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"bad value for config key {key!r}: {value!r} is not one of {', '.join(registry)}{hint}")


def check_data_exists(cfg: TrainConfig) -> None:
    """Refuse training and evaluation data that is not there (before a run builds anything).

    Separate from ``load_config``: recipes are also loaded where their data is not (counting a
    ViT-L recipe, a dry run on a login node)."""
    if cfg.data_source == "webdataset":
        _check_split_exists("data", cfg.data.shards, cfg.data.index)
    if cfg.eval.every:
        _check_split_exists("eval", cfg.eval.shards, cfg.eval.index)
        _check_split_exists("eval", cfg.eval.train_shards, cfg.eval.train_index, prefix="train_")
        _check_split_exists("eval.dense", cfg.eval.dense.shards, cfg.eval.dense.index)
        _check_split_exists("eval.dense", cfg.eval.dense.val_shards, cfg.eval.dense.val_index, prefix="val_")


def _check_split_exists(section: str, shards: str, index: str | None, prefix: str = "") -> None:
    """Refuse an index file that is not there, or a shard spec none of whose local shards is
    (a few missing shards are skipped and counted at run time instead)."""
    from ..data.errors import DataError
    from ..data.shards import expand_spec, is_local

    if index and is_local(index) and not Path(index).is_file():
        raise ConfigError(f"{section}.{prefix}index={index!r}: no such file")
    if not shards:
        return
    try:
        urls = expand_spec(shards)
    except (ValueError, DataError) as err:  # a malformed spec, or a glob that matches nothing
        raise ConfigError(f"{section}.{prefix}shards={shards!r}: {err}") from None
    local = [u for u in urls if is_local(u)]
    if local and len(local) == len(urls) and not any(Path(u).exists() for u in local):
        raise ConfigError(f"{section}.{prefix}shards={shards!r}: none of its {len(local)} shards exists "
                          f"(first: {local[0]})")


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), Path(path))
