"""Continued pretraining under fsdp2 on 2 gloo ranks: the heads train alone while the sharded
backbone gets no gradient (its root parameters and its blocks' shards alike stay bit-identical,
under AdamW with weight decay), then it trains."""
import torch

from data_fixtures import make_shards
from engine_helpers import spawn
from lspretrain.convert import read_source
from test_continue import FROZEN, STEPS, continue_recipe, dinov2_method, ours_released


def test_frozen_backbone_stays_the_release_under_fsdp2(tmp_path):
    release = tmp_path / "release.pth"
    ours_released(release)
    recipe = continue_recipe(tmp_path / "run", None, "paper", release)
    recipe["data"] = {"shards": make_shards(str(tmp_path / "shards"), n=48, per_shard=12, size=28), "mode": "resampled",
                      "batch_size": 4, "num_workers": 1, "require_label": False}
    recipe["strategy"] = {"name": "fsdp2", "precision": "fp32"}
    result = spawn(2, recipe)
    assert result["status"] == "completed" and result["step"] == STEPS
    imported = dinov2_method("paper", init_from=str(release), init_from_format="dinov2").teacher.backbone.state_dict()
    for which in ("teacher", "student"):
        sd = read_source(tmp_path / "run" / "checkpoints" / f"step_{FROZEN:08d}", which).state_dict
        assert all(torch.equal(v, imported[k]) for k, v in sd.items()), which
    final = read_source(tmp_path / "run", "student").state_dict
    for k in ("pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.norm1.cls_weight"):  # root and block parameters
        assert not torch.equal(final[k], imported[k]), k
