"""Shard writer: real tar files on disk, read back with tarfile and with the reader."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_fixtures import key_collate, make_shards, pixels
from lspretrain.data import DataConfig, build_loader
from lspretrain.data.shard_writer import (EncodeOptions, Item, csv_items, fashion_mnist_shards, find_fashion_mnist,
                                          imagefolder_items, read_idx, write_shards)
from lspretrain.data.shards import ShardIndex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t}


def test_round_trip_images_labels_meta(tmp_path):
    spec = make_shards(str(tmp_path), n=25, per_shard=10)
    index = ShardIndex.load(str(tmp_path / "s-index.json"))
    assert [s["num_samples"] for s in index.shards] == [10, 10, 5]
    assert index.classes == [str(c) for c in range(10)]
    m = _members(tmp_path / "s-000001.tar")
    assert sorted(m)[:3] == ["000000010.cls", "000000010.json", "000000010.png"]
    assert json.loads(m["000000010.json"]) == {"path": "img10", "size": [8, 8], "label": 0}
    # The reader gives back the exact pixels and labels (PNG is lossless).
    got = {}
    cfg = DataConfig(shards=spec, batch_size=5, num_workers=0, shuffle_window=1)
    for b in build_loader(cfg, None, lambda s: {"x": s}, rank=0, world_size=1):
        for s in b["x"]:
            got[int(s["key"])] = s
    assert sorted(got) == list(range(25))
    for i, s in got.items():
        assert s["label"] == i % 10
        np.testing.assert_array_equal(np.asarray(s["image"]), pixels(i))


def test_max_bytes_rolls_over_and_shuffle_is_seeded(tmp_path):
    items = [Item(f"i{i}", i, pixels(i, 32)) for i in range(12)]
    idx = write_shards(items, str(tmp_path / "a"), "p", max_bytes=8000, options=EncodeOptions("png"), num_workers=1)
    assert len(idx.shards) > 1 and idx.num_samples == 12
    for s in idx.shards:  # every shard but single-sample ones respects the limit
        assert s["num_bytes"] <= 8000 + 10240 or s["num_samples"] == 1
    labels = []
    for seed_dir in ("b", "c"):
        write_shards(items, str(tmp_path / seed_dir), "p", shuffle_seed=3, options=EncodeOptions("png"), num_workers=2)
        m = _members(tmp_path / seed_dir / "p-000000.tar")
        labels.append([int(m[k]) for k in sorted(m) if k.endswith(".cls")])
    assert labels[0] == labels[1] and labels[0] != list(range(12)) and sorted(labels[0]) == list(range(12))


def test_imagefolder_and_csv_skip_corrupt_inputs(tmp_path):
    root = tmp_path / "tree"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(pixels(10 * c + i)).save(root / name / f"{i}.jpg", quality=95)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    items, classes = imagefolder_items(str(root))
    assert classes == ["cat", "dog"] and len(items) == 7
    idx = write_shards(items, str(tmp_path / "out"), "f", classes, num_workers=2)
    assert idx.num_samples == 6
    assert [s["path"] for s in idx.skipped] == [str(root / "dog" / "broken.jpg")]
    # "keep" stores the original JPEG bytes untouched.
    m = _members(tmp_path / "out" / "f-000000.tar")
    assert m["000000000.jpg"] == (root / "cat" / "0.jpg").read_bytes()

    (tmp_path / "list.tsv").write_text("path\tlabel\n" + "".join(
        f"tree/{n}/{i}.jpg\t{n}\n" for n in ("dog", "cat") for i in range(2)) + "tree/missing.jpg\tcat\n")
    items, classes = csv_items(str(tmp_path / "list.tsv"))
    assert classes == ["cat", "dog"] and [it.label for it in items] == [1, 1, 0, 0, 0]
    idx = write_shards(items, str(tmp_path / "out2"), "c", classes, num_workers=1)
    assert idx.num_samples == 4 and "missing.jpg" in idx.skipped[0]["path"]


def test_cli_writes_folder_shards_with_progress(tmp_path):
    root = tmp_path / "tree" / "only"
    root.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(pixels(i)).save(root / f"{i}.png")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), "folder", str(tmp_path / "tree"),
                        str(tmp_path / "out"), "--prefix", "x", "--max-count", "2", "--workers", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "5 samples, 3 shards, 0 skipped" in r.stdout
    assert "samples/s" in r.stderr and "ETA" in r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["x-000000.tar", "x-000001.tar", "x-000002.tar", "x-index.json"]


def test_fashion_mnist_round_trip(tmp_path):
    folder = find_fashion_mnist()
    if folder is None:
        pytest.skip("Fashion-MNIST IDX files absent (apt-get install dataset-fashion-mnist)")
    path = fashion_mnist_shards(str(tmp_path), "test", max_count=4000, shuffle_seed=None, num_workers=2)
    index = ShardIndex.load(path)
    assert [s["num_samples"] for s in index.shards] == [4000, 4000, 2000]
    assert index.classes[9] == "Ankle boot"
    mtime = os.path.getmtime(tmp_path / "fashion-mnist-test-000000.tar")
    assert fashion_mnist_shards(str(tmp_path), "test", max_count=4000, shuffle_seed=None) == path  # reused
    assert os.path.getmtime(tmp_path / "fashion-mnist-test-000000.tar") == mtime
    x = read_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
    cfg = DataConfig(shards=str(tmp_path / "fashion-mnist-test-{000000..000002}.tar"), batch_size=100,
                     num_workers=2, shuffle_window=64)
    seen = 0
    for b in build_loader(cfg, None, lambda s: {"x": s}, rank=0, world_size=1):
        for s in b["x"]:
            i = int(s["key"])
            assert s["label"] == y[i]
            np.testing.assert_array_equal(np.asarray(s["image"])[..., 0], x[i])
            seen += 1
    assert seen == 10_000
