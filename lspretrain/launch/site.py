"""Per-site launcher defaults: an optional YAML file, so no cluster name or path lives in code.

Looked up in order: ``$LSPRETRAIN_SITE_CONFIG`` (must exist when set), then
``$XDG_CONFIG_HOME/lspretrain/site.yaml`` (``~/.config/lspretrain/site.yaml``). Every key is
optional; command-line flags win over the file.

    partition: gpu
    account: my-project
    qos: normal
    constraint: h100
    exclude: node[013,077]
    timeout_min: 4320
    mem_gb: 0            # 0: let the site decide
    cpus_per_task: 12
    max_requeues: 5
    signal_lead_s: 120   # seconds before the time limit at which jobs checkpoint
    run_root: /checkpoint/me/lspretrain   # default parent of --run-dir
    sbatch:              # extra sbatch options, name: value (true for a bare flag)
      comment: pretraining
    setup:               # shell lines run before srun, verbatim
      - module load cuda/12.4
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .spec import SlurmOptions

__all__ = ["SiteDefaults", "SiteConfigError", "site_config_path", "load_site_defaults"]

ENV_VAR = "LSPRETRAIN_SITE_CONFIG"


class SiteConfigError(ValueError):
    """The site file is missing (when named explicitly) or holds an unknown key or a bad value."""


@dataclass(frozen=True, kw_only=True)
class SiteDefaults(SlurmOptions):
    run_root: str = "runs"
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)


def site_config_path(environ: dict[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    if env.get(ENV_VAR):
        path = Path(env[ENV_VAR]).expanduser()
        if not path.is_file():
            raise SiteConfigError(f"{ENV_VAR}={env[ENV_VAR]!r}: no such file")
        return path
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = base / "lspretrain" / "site.yaml"
    return path if path.is_file() else None


def load_site_defaults(path: Path | None = None) -> SiteDefaults:
    """Defaults from ``path`` (or the looked-up site file); built-in defaults when there is none."""
    path = site_config_path() if path is None else path
    if path is None:
        return SiteDefaults()
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SiteConfigError(f"{path}: expected a mapping of option: value, got {type(raw).__name__}")
    known = {f.name: f for f in fields(SiteDefaults)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SiteConfigError(f"{path}: unknown key(s) {unknown}; valid: {sorted(known)}")
    for key, value in raw.items():
        expected = _expected_type(key)
        if value is not None and not isinstance(value, expected) or isinstance(value, bool) and expected is int:
            raise SiteConfigError(f"{path}: {key}={value!r} should be {expected.__name__}")
    if not all(isinstance(line, str) for line in raw.get("setup", [])):
        raise SiteConfigError(f"{path}: setup must be a list of shell lines (strings)")
    return SiteDefaults(**{k: v for k, v in raw.items() if v is not None})


def _expected_type(key: str) -> type:
    return {"sbatch": dict, "setup": list}.get(key) or (
        int if isinstance(getattr(SlurmOptions(), key, None), int) else str
    )
