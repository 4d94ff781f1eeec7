"""Periodic evaluation inside a training run: the dense linear probe (``eval.dense``) on the
method's evaluation backbone, logged under ``eval/dense/`` beside the method's own metrics."""
from __future__ import annotations

import pytest

from engine_helpers import read_merged, run_worker
from lspretrain.data.mosaic import fashion_mnist_mosaic_shards
from lspretrain.data.shard_writer import find_fashion_mnist
from lspretrain.engine.config import ConfigError, load_config
from test_dinov2_dist import dinov2_recipe
from data_fixtures import make_shards

pytestmark = pytest.mark.skipif(find_fashion_mnist(None) is None,
                                reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mosaics"))
    return {split: fashion_mnist_mosaic_shards(out, split, k=2, count=n) for split, n in (("train", 48), ("test", 16))}


def dense(mosaics, **kw) -> dict:
    # 2 x 2 items of 28 px resized to 32 px: 16 px windows, one item each, as the model trains.
    return {"index": mosaics["train"], "val_index": mosaics["test"], "resize": 32, "epochs": 3,
            "max_samples": 48, "max_val_samples": 16, "batch_size": 32, **kw}


def test_dinov2_run_logs_the_dense_probe_of_its_teacher(tmp_path, mosaics):
    shards = make_shards(str(tmp_path / "shards"), n=32, per_shard=16, size=20)
    recipe = dinov2_recipe(tmp_path / "run", shards, {"name": "single", "precision": "fp32"}, steps=4)
    recipe["eval"] = {"every": 2, "shards": shards, "train_shards": shards, "max_samples": 32, "batch_size": 16,
                      "dense": dense(mosaics)}
    out = run_worker(recipe)
    assert out["status"] == "completed"
    rows = read_merged(tmp_path / "run")
    for step in (2, 4):
        miou, acc = rows[step]["eval/dense/miou"], rows[step]["eval/dense/pixel_acc"]
        assert 0.0 < miou <= 100.0 and 0.0 < acc <= 100.0
        assert "eval/knn_top1" in rows[step]  # the method's own evaluation still runs
        assert any(k.startswith("eval/dense/iou/") for k in rows[step])
    assert rows[4]["eval/dense/miou"] != rows[2]["eval/dense/miou"]  # the teacher moved between them


def test_a_dense_section_without_its_validation_split_is_refused(tmp_path, mosaics):
    shards = make_shards(str(tmp_path / "shards"), n=16, per_shard=16, size=20)
    recipe = dinov2_recipe(tmp_path / "run", shards, {"name": "single", "precision": "fp32"})
    recipe["eval"] = {"every": 2, "dense": {"index": mosaics["train"]}}
    with pytest.raises(ConfigError, match="eval.dense: dense evaluation needs val_shards or val_index"):
        load_config(recipe)
