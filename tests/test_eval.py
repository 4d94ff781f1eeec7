"""k-NN and linear probe on toy problems with known answers; PCA maps and the grid picture."""
import torch
import torch.nn.functional as F

from lspretrain.eval import extract_features, knn_accuracy, knn_predict, linear_probe, pca_grid
from lspretrain.eval.pca import feature_maps, pca_rgb
from lspretrain.models import build_backbone


def test_knn_votes_by_hand():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    test = F.normalize(torch.tensor([[0.6, 0.8]]), dim=-1)
    scores = knn_predict(train, labels, test, num_classes=2, k=3, temperature=0.5)
    sims = test @ train.t()
    expected = torch.tensor([[(sims[0, 0] / 0.5).exp() + (sims[0, 1] / 0.5).exp(), (sims[0, 2] / 0.5).exp()]])
    torch.testing.assert_close(scores, expected)


def test_knn_on_separable_and_noisy_clusters():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=-1) * 5
    def sample(n, noise):
        labels = torch.arange(4).repeat_interleave(n)
        return F.normalize(centers[labels] + noise * torch.randn(4 * n, 16, generator=g), dim=-1), labels
    xtr, ytr = sample(50, 0.1)
    xte, yte = sample(25, 0.1)
    assert knn_accuracy(xtr, ytr, xte, yte) == {"top1": 100.0, "top5": 100.0}
    # Random labels carry no signal: accuracy near chance (25 %).
    shuffled = ytr[torch.randperm(len(ytr), generator=g)]
    assert knn_accuracy(xtr, shuffled, xte, yte)["top1"] < 50.0


def test_linear_probe_learns_a_linear_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], epochs=100)
    assert res["top1"] > 95.0


def test_extract_features_normalised_and_ordered():
    model = build_backbone("vit_tiny_patch16", "paper", embed_dim=32, depth=2, num_heads=2, img_size=32, layerscale_init=0.1)
    batches = [{"images": torch.randn(3, 3, 32, 32), "labels": torch.tensor([i, i, i])} for i in range(2)]
    feats, labels = extract_features(model, batches)
    assert feats.shape == (6, 32) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(6))


def test_pca_removes_a_constant_background():
    # Foreground patches vary along 3 directions; background patches sit at one point.
    g = torch.Generator().manual_seed(0)
    feats = torch.zeros(2, 6, 6, 8)
    feats[:] = torch.tensor([5.0] + [0.0] * 7)
    feats[:, 2:4, 2:4] = torch.randn(2, 2, 2, 8, generator=g) - torch.tensor([5.0] + [0.0] * 7)
    rgb, fg = pca_rgb(feats)
    assert fg[:, 2:4, 2:4].all() and fg.sum() == 8
    assert (rgb[~fg] == 0).all() and rgb[fg].max() == 1.0 and rgb[fg].min() == 0.0


def test_pca_grid_png(tmp_path):
    torch.manual_seed(0)
    kw = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, layerscale_init=0.1)
    plain = build_backbone("vit_tiny_patch16", "none", patch_size=8, **kw)
    special = build_backbone("vit_tiny_patch16", "paper", patch_size=8, **kw)
    images = torch.randn(3, 3, 32, 32)
    maps = feature_maps(plain, images)
    assert maps["patches"].shape == (3, 4, 4, 32) and maps["norms"].shape == (3, 4, 4)
    grid = pca_grid([("plain", plain), ("paper", special)], images, cell=64)
    path = tmp_path / "grid.png"
    grid.save(path)
    from PIL import Image

    img = Image.open(path)
    # input + 2 columns per model; a row per image; at cell 64 the titles wrap to 3 lines (51 px
    # header) and the colour bars with their values take a 61 px footer
    assert img.size == (64 * 5, 51 + 64 * 3 + 61)
    assert len(set(img.crop((64, 51, 128, 115)).getdata())) > 1  # a PCA tile is not flat


def test_pca_tool_on_a_run_directory(tmp_path):
    """tools/pca_features.py on a real training checkpoint (and an exported file) side by side."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from lspretrain.convert import read_source, write

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_helpers import run_worker, tiny_recipe

    run_worker(tiny_recipe(tmp_path / "run", steps=2))
    write(read_source(tmp_path / "run"), "safetensors", tmp_path / "bb.safetensors")
    images = []
    for i in range(2):
        images.append(tmp_path / f"im{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(images[-1])
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "tools" / "pca_features.py"), str(tmp_path / "run"),
                          str(tmp_path / "bb.safetensors"), "--images", *map(str, images), "--out", str(tmp_path / "g.png"),
                          "--cell", "64"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # the source names wrap to 5 title lines (81 px), 2 image rows, the 61 px colour-bar footer
    assert Image.open(tmp_path / "g.png").size == (64 * 5, 81 + 64 * 2 + 61)
    bad = subprocess.run([sys.executable, str(root / "tools" / "pca_features.py"), str(tmp_path / "nothing"),
                          "--images", str(images[0]), "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nothing" in bad.stderr


def test_evaluation_images_cached_when_small_streamed_when_large(tmp_path):
    from data_fixtures import make_shards
    from lspretrain.eval.data import LabelledImages, evaluation_images

    spec = make_shards(str(tmp_path), n=30, per_shard=8, size=12)
    cached = evaluation_images(spec, None, 16, 25, 10, cache_bytes=1 << 20)  # 25 x 3 x 16 x 16 x 4 = 77 KB
    streamed = evaluation_images(spec, None, 16, 25, 10, cache_bytes=50_000)
    assert isinstance(cached, list) and isinstance(streamed, LabelledImages)
    assert [len(b["labels"]) for b in cached] == [10, 10, 5]  # exactly max_samples
    for _ in range(2):  # a stream decodes the same images again at each evaluation
        again = list(streamed)
        assert all(torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
                   for a, b in zip(cached, again)) and len(again) == len(cached)
    assert cached[0]["images"].shape == (10, 3, 16, 16)
