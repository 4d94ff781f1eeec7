"""Bad data: every case is skipped and counted, or stops before training with a clear error."""
from __future__ import annotations

import io
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_fixtures import keys_of, loader, make_shards, pixels
from lspretrain.data import BadDataError, DataError
from lspretrain.data.decode import decode_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_tar(path, samples: list[tuple[str, dict]]) -> None:
    with tarfile.open(path, "w") as t:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


GOOD = _encode(Image.fromarray(pixels(0)), "PNG")


def test_odd_image_modes_decode_to_8bit_rgb():
    grey = Image.fromarray(np.full((4, 4), 77, np.uint8), "L")
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    deep = Image.fromarray(np.full((4, 4), 0x8000, np.uint16))  # 16-bit grey at half range
    palette = Image.fromarray(np.full((4, 4), 200, np.uint8), "L").convert("P")
    cases = {
        "grey jpeg": (_encode(grey, "JPEG", quality=100), 77),
        "cmyk jpeg": (_encode(cmyk, "JPEG", quality=100), (255, 0, 0)),
        "16-bit png": (_encode(deep, "PNG"), 128),
        "palette png": (_encode(palette, "PNG"), 200),
    }
    for name, (data, expect) in cases.items():
        for decoder in ("auto", "pil"):
            img = decode_image(data, decoder)
            arr = np.asarray(img)
            assert img.mode == "RGB" and arr.dtype == np.uint8 and arr.shape == (4, 4, 3), name
            assert np.abs(arr.astype(int) - np.array(expect)).max() <= 2, (name, arr[0, 0])


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    grey = _encode(Image.fromarray(np.full((8, 8), 9, np.uint8), "L"), "JPEG")
    write_tar(tmp_path / "b-000000.tar", [
        ("k0", {"png": GOOD, "cls": b"1"}),
        ("k1", {"jpg": b"\xff\xd8\xff\xe0garbage", "cls": b"2"}),  # corrupt JPEG
        ("k2", {"cls": b"3", "json": b"{}"}),  # no image
        ("k3", {"png": GOOD}),  # no label
        ("k4", {"png": GOOD, "cls": b"cat"}),  # label is not an integer
        ("k5", {"jpg": grey, "cls": b"5"}),  # grayscale: fine
        ("k6", {"png": GOOD[: len(GOOD) // 2], "cls": b"6"}),  # truncated PNG
    ])
    caplog.set_level(logging.WARNING)
    ld = loader(str(tmp_path / "b-000000.tar"), num_workers=0, max_bad_fraction=1.0)
    assert sorted(keys_of(ld)) == ["k0", "k5"]
    s = ld.stats()
    assert s["samples"] == 2 and s["bad_samples"] == 5 and s["bad_shards"] == 0
    assert (s["bad_sample/corrupt_image"], s["bad_sample/no_image"], s["bad_sample/no_label"],
            s["bad_sample/bad_label"]) == (2, 1, 1, 1)
    assert any("b-000000.tar key k1" in r.getMessage() for r in caplog.records)
    # Label optional (SSL): the unlabelled sample is kept with label -1.
    ld = loader(str(tmp_path / "b-000000.tar"), num_workers=2, max_bad_fraction=1.0, require_label=False)
    labels = {k: l for b in ld for k, l in zip(b["keys"], b["labels"])}
    assert labels == {"k0": 1, "k3": -1, "k5": 5}
    assert ld.stats()["bad_samples"] == 4  # counted in workers, summed in the main process


def test_truncated_tar_keeps_what_was_readable(tmp_path):
    spec = make_shards(str(tmp_path), n=30, per_shard=10, size=16)
    path = tmp_path / "s-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut mid-way: about half of its samples survive
    ld = loader(spec, rank=0, world_size=1, max_bad_fraction=0.5, shuffle_window=4)
    keys = keys_of(ld)
    s = ld.stats()
    lost = {f"{i:09d}" for i in range(10, 20)} - set(keys)
    assert 3 <= len(lost) <= 7 and len(keys) == len(set(keys)) == 30 - len(lost)
    assert s["bad_samples"] == s["bad_sample/missing_sample"] == len(lost)
    assert s["bad_shard/truncated_shard"] >= 1


def test_empty_and_missing_shards_are_skipped(tmp_path):
    spec = make_shards(str(tmp_path), n=12, per_shard=6)
    write_tar(tmp_path / "empty.tar", [])
    (tmp_path / "zero.tar").write_bytes(b"")
    spec = "::".join([spec, str(tmp_path / "empty.tar"), str(tmp_path / "zero.tar"), str(tmp_path / "gone.tar")])
    ld = loader(spec, max_bad_fraction=0.0)
    assert sorted(keys_of(ld)) == [f"{i:09d}" for i in range(12)]
    s = ld.stats()
    assert (s["bad_shards"], s["bad_shard/empty_shard"], s["bad_shard/missing_shard"], s["bad_samples"]) == (3, 2, 1, 0)


def test_shard_failing_at_read_time(tmp_path):
    spec = make_shards(str(tmp_path), n=18, per_shard=6)
    os.remove(tmp_path / "s-000002.tar")  # the index still promises its 6 samples
    pipe = f"pipe:cat {tmp_path}/s-{{000000..000002}}.tar"
    ld = loader(pipe, index=str(tmp_path / "s-index.json"), max_bad_fraction=0.5)
    assert sorted(keys_of(ld)) == [f"{i:09d}" for i in range(12)]
    s = ld.stats()
    assert s["bad_sample/missing_sample"] == 6 and s["bad_shard/unreadable_shard"] >= 1


def test_too_many_bad_samples_abort_with_a_clear_message(tmp_path):
    write_tar(tmp_path / "c-000000.tar", [(f"k{i}", {"jpg": b"\xff\xd8junk", "cls": b"0"}) if i % 2 else
                                          (f"k{i}", {"png": GOOD, "cls": b"0"}) for i in range(40)])
    ld = loader(str(tmp_path / "c-000000.tar"), max_bad_fraction=0.2, bad_check_min_samples=10)
    with pytest.raises(BadDataError, match=r"samples were bad \(\d+\.\d% > max_bad_fraction 20\.0%\).*corrupt_image(.|\n)*c-000000.tar key k\d+ "):
        list(ld)


def test_nothing_to_train_on_fails_before_training(tmp_path):
    with pytest.raises(DataError, match="matched no shards"):
        loader(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(DataError, match="none of the 3 shards"):
        loader(str(tmp_path / "x-{0..2}.tar"))
    write_tar(tmp_path / "e.tar", [])
    with pytest.raises(DataError, match="hold no samples"):
        loader(str(tmp_path / "e.tar"))
