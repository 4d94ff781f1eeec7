"""Engine features that must not change the numbers: gradient accumulation (2 x 4 = one batch
of 8), activation checkpointing (full, selective) and per-block torch.compile."""
import pytest

from engine_helpers import read_steps, run_worker, tiny_recipe

STEPS = 4


def losses(run_dir):
    rows = read_steps(run_dir)
    return [rows[s]["loss"] for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    run_worker(tiny_recipe(run_dir, steps=STEPS, batch=8))
    return losses(run_dir)


def test_gradient_accumulation_equals_the_large_batch(tmp_path, reference):
    run_worker(tiny_recipe(tmp_path, steps=STEPS, batch=4, optim={"accum_steps": 2}))
    assert losses(tmp_path) == pytest.approx(reference, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_numbers(tmp_path, reference, mode):
    run_worker(tiny_recipe(tmp_path, steps=STEPS, batch=8,
                           strategy={"name": "single", "precision": "fp32", "activation_checkpointing": mode}))
    assert losses(tmp_path) == pytest.approx(reference, rel=1e-6, abs=1e-7)


def test_per_block_compile_keeps_the_numbers(tmp_path, reference):
    run_worker(tiny_recipe(tmp_path, steps=STEPS, batch=8, strategy={"name": "single", "precision": "fp32", "compile": True}))
    assert losses(tmp_path) == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_features_are_applied_to_the_blocks(tmp_path):
    """The tests above would pass vacuously if nothing were applied: check that it is."""
    import functools

    from lspretrain.engine.config import load_config
    from lspretrain.train import build

    cfg = load_config(tiny_recipe(tmp_path, strategy={"name": "single", "precision": "fp32",
                                                      "activation_checkpointing": "selective", "ac_every": 2}))
    trainer, _ = build(cfg)  # the trainer sets the strategy up, which parallelizes the method
    wrapped = [isinstance(b.forward, functools.partial) for b in trainer.method.backbone.blocks]
    assert wrapped == [True, False]  # every 2nd block, starting with the first
