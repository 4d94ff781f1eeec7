"""Launch spec, site defaults and the rendered sbatch script (no SLURM needed)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lspretrain.launch.site import SiteConfigError, SiteDefaults, load_site_defaults, site_config_path
from lspretrain.launch.spec import LaunchError, LaunchSpec, sbatch_script
from lspretrain.launch.submit import build_spec, main, parse_args

NASTY = """it's a "quoted" run; $(touch /tmp/pwned) `x` \\ end"""


def _sbatch_options(script: str) -> dict[str, str | bool]:
    """#SBATCH lines parsed back the way a shell would read their values."""
    options: dict[str, str | bool] = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            (word,) = shlex.split(line[len("#SBATCH "):])
            key, sep, value = word.partition("=")
            options[key[2:]] = value if sep else True
    return options


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("run:\n  total_steps: 2\n")
    return path


def test_site_file_lookup_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LSPRETRAIN_SITE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert site_config_path() is None and load_site_defaults() == SiteDefaults()
    (tmp_path / "lspretrain").mkdir()
    (tmp_path / "lspretrain" / "site.yaml").write_text("partition: gpu\nsetup: [module load cuda]\n")
    assert load_site_defaults() == SiteDefaults(partition="gpu", setup=["module load cuda"])
    monkeypatch.setenv("LSPRETRAIN_SITE_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(SiteConfigError, match="missing.yaml"):
        load_site_defaults()
    bad = tmp_path / "bad.yaml"
    bad.write_text("partiton: gpu\n")
    with pytest.raises(SiteConfigError, match="partiton"):
        load_site_defaults(bad)
    bad.write_text("timeout_min: long\n")
    with pytest.raises(SiteConfigError, match="timeout_min='long'"):
        load_site_defaults(bad)


def test_flags_win_over_site_defaults(recipe, tmp_path):
    site = SiteDefaults(partition="site-part", account="acct", timeout_min=600, run_root=str(tmp_path / "runs"))
    spec = build_spec(parse_args([str(recipe), "--partition", "cli-part", "--nodes", "2", "a.b=1"]), site)
    assert (spec.partition, spec.account, spec.timeout_min, spec.nodes) == ("cli-part", "acct", 600, 2)
    assert spec.run_dir == (tmp_path / "runs" / "recipe").resolve()
    assert spec.trainer_argv() == [str(recipe.resolve()), "a.b=1", f"run.dir={spec.run_dir}"]


def test_sbatch_script_quotes_every_user_value(recipe, tmp_path):
    run_dir = tmp_path / NASTY
    site = SiteDefaults(account=NASTY, sbatch={"comment": NASTY, "overcommit": True}, setup=["echo set up"])
    args = parse_args([str(recipe), "--name", NASTY, "--run-dir", str(run_dir), "--partition", "p q",
                       "--nodes", "2", "--gpus-per-node", "4", "--timeout-min", "30", "--mem-gb", "64"])
    spec = build_spec(args, site)
    script = sbatch_script(spec, python="/opt/my python/bin/python")
    opts = _sbatch_options(script)
    assert opts["job-name"] == opts["account"] == opts["comment"] == NASTY
    assert opts["partition"] == "p q"
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"], opts["time"]) == ("2", "4", "4", "30")
    assert (opts["mem"], opts["overcommit"], opts["requeue"]) == ("64GB", True, True)
    assert opts["signal"] == "USR1@120"
    assert opts["output"] == str(run_dir.resolve() / "submitit" / "%j_0_log.out")
    body = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert body[:2] == ["export SUBMITIT_PREEMPT_SIGNAL=USR1", "echo set up"]
    srun = shlex.split(body[-1])
    assert srun[0] == "srun" and srun[-5:] == ["/opt/my python/bin/python", "-u", "-m", "submitit.core._submit",
                                               str(run_dir.resolve() / "submitit")]


def test_cpu_job_has_one_task_per_node_and_no_gpu_request(recipe, tmp_path):
    spec = build_spec(parse_args([str(recipe), "--nodes", "2", "--run-dir", str(tmp_path)]), SiteDefaults())
    opts = _sbatch_options(sbatch_script(spec))
    assert opts["ntasks-per-node"] == "1" and "gpus-per-node" not in opts and "partition" not in opts


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.yaml"], "recipe '.*missing.yaml' does not exist"),
        (["{recipe}", "--nodes", "0"], "--nodes=0"),
        (["{recipe}", "--gpus-per-node", "-1"], "--gpus-per-node=-1"),
        (["{recipe}", "notanoverride"], "override 'notanoverride'"),
        (["{recipe}", "--timeout-min", "1"], "signal lead 120 s >= time limit 1 min"),
        (["{recipe}", "--name", "two\nlines"], r"--name 'two\\nlines': control characters"),
    ],
)
def test_validation_names_the_value_at_fault(recipe, tmp_path, argv, message):
    args = parse_args([a.format(recipe=recipe) for a in argv] + ["--run-dir", str(tmp_path)])
    with pytest.raises(LaunchError, match=message):
        build_spec(args, SiteDefaults()).validate()


@pytest.mark.parametrize("name", ["../../../escape", "a/b", "..", "."])
def test_a_name_that_is_not_one_file_name_cannot_name_the_run_directory(recipe, tmp_path, name):
    site = SiteDefaults(run_root=str(tmp_path / "runs"))
    with pytest.raises(LaunchError, match=re.escape(f"--name {name!r}: the run directory would be <run_root>/<name>")):
        build_spec(parse_args([str(recipe), "--name", name]), site)
    # With an explicit run directory the name is only the job name.
    spec = build_spec(parse_args([str(recipe), "--name", name, "--run-dir", str(tmp_path / "r")]), site)
    assert spec.name == name and spec.run_dir == (tmp_path / "r").resolve()


def test_escaping_name_is_refused_before_anything_is_created(recipe, tmp_path, monkeypatch, capsys):
    root = tmp_path / "deep" / "er" / "runs"
    site = tmp_path / "site.yaml"
    site.write_text(f"run_root: {root}\n")
    monkeypatch.setenv("LSPRETRAIN_SITE_CONFIG", str(site))
    assert main([str(recipe), "--name", "../../../escape", "--local"]) == 2
    assert capsys.readouterr().err.startswith("error: --name '../../../escape': the run directory would be")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "site.yaml"]


def test_spec_is_frozen(recipe, tmp_path):
    spec = LaunchSpec(recipe=recipe, run_dir=tmp_path, name="n")
    with pytest.raises(AttributeError):
        spec.nodes = 3  # type: ignore[misc]
