"""make-shards: round trip, index.json, pairing by preset layouts, problems counted and reported."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from primaps_dist.cli import main as cli_main
from primaps_dist.data import shards as make_shards
from primaps_dist.data.synthetic import encode_image
from primaps_dist.errors import UserError


def read_tars(out: Path) -> dict[str, dict[str, bytes]]:
    """All samples of the shards in ``out``: key -> {suffix: bytes}, in file order (dict order)."""
    samples: dict[str, dict[str, bytes]] = {}
    for name in sorted(os.listdir(out)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(out / name) as archive:
            for member in archive.getmembers():
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, {"__shard__": name.encode()})[suffix] = archive.extractfile(member).read()
    return samples


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture()
def folders(tmp_path) -> tuple[Path, Path, dict]:
    """images/ (png, jpg, greyscale, nested, dotted names) and labels/ with class ids 0..3."""
    rng = np.random.default_rng(0)
    images, labels = tmp_path / "images", tmp_path / "labels"
    expected = {}
    names = ["a", "b", "c", "d", "e", "f", "g", "sub/dir/h", "x.y", "sub/k"]
    for i, name in enumerate(names):
        height, width = 20 + i, 30 + 2 * i
        pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        if i % 3 == 0:
            data, suffix = encode_image(pixels, "JPEG", quality=90), ".jpg"
        elif i % 3 == 1:
            data, suffix = encode_image(pixels[..., 0]), ".png"  # greyscale
        else:
            data, suffix = encode_image(pixels), ".png"
        write_file(images / f"{name}{suffix}", data)
        label = rng.integers(0, 4, size=(height, width), dtype=np.uint8)
        label[0, 0] = 255
        write_file(labels / f"{name}.png", encode_image(label))
        expected[name] = (data, label, (width, height))
    return images, labels, expected


def run(*args: str) -> int:
    return make_shards.main(list(args))


def test_round_trip_keeps_bytes_and_labels(folders, tmp_path, capsys):
    images, labels, expected = folders
    out = tmp_path / "out"
    assert run("--images", str(images), "--labels", str(labels), "--out", str(out), "--shard-size", "4") == 0
    samples = read_tars(out)
    keys = {"a", "b", "c", "d", "e", "f", "g", "sub__dir__h", "x_y", "sub__k"}
    assert set(samples) == keys
    for name, (data, label, _) in expected.items():
        sample = samples[name.replace("/", "__").replace(".", "_")]
        ext = "jpg" if "jpg" in sample else "png"
        assert sample[ext] == data, "original encoded bytes"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["label.png"]))), label)
        assert Image.open(io.BytesIO(sample["label.png"])).mode == "L"
    assert sorted(os.listdir(out)) == ["000000.tar", "000001.tar", "000002.tar", "index.json"]
    assert "wrote 10 samples in 3 shards" in capsys.readouterr().out


def test_index_json(folders, tmp_path):
    images, labels, expected = folders
    out = tmp_path / "out"
    run("--images", str(images), "--labels", str(labels), "--out", str(out), "--shard-size", "4", "--seed", "3")
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 10
    assert [s["num_samples"] for s in index["shards"]] == [4, 4, 2]
    assert [s["name"] for s in index["shards"]] == ["000000.tar", "000001.tar", "000002.tar"]
    assert index["num_classes"] == 4 and index["class_names"] is None and index["preset"] is None
    assert index["has_labels"] and index["seed"] == 3 and index["num_skipped"] == 0 and index["skipped"] == {}
    sizes = [size for _, _, size in expected.values()]
    assert index["image_size"]["min_width"] == min(w for w, _ in sizes)
    assert index["image_size"]["max_height"] == max(h for _, h in sizes)
    assert sum(index["image_size"]["histogram"].values()) == 10
    pixels = sum(int((label < 4).sum()) for _, label, _ in expected.values())
    assert sum(index["class_pixel_counts"].values()) == pixels and index["ignored_pixels"] == 10


def test_class_names_file_sets_num_classes(folders, tmp_path):
    images, labels, _ = folders
    names = tmp_path / "classes.json"
    names.write_text(json.dumps({"classes": ["w", "x", "y", "z", "extra"]}))
    run("--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "o"), "--classes", str(names))
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert index["num_classes"] == 5 and index["class_names"] == ["w", "x", "y", "z", "extra"]


def test_same_seed_same_bytes_and_shuffled_order(folders, tmp_path):
    images, labels, _ = folders
    outs = []
    for name, seed in (("one", "1"), ("two", "1"), ("three", "2")):
        run("--images", str(images), "--labels", str(labels), "--out", str(tmp_path / name), "--seed", seed)
        outs.append((tmp_path / name / "000000.tar").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    order = list(read_tars(tmp_path / "one"))
    assert order != sorted(order), "write-time shuffle"


def test_parallel_workers_give_identical_shards(folders, tmp_path):
    images, labels, _ = folders
    run("--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "serial"))
    run("--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "parallel"), "--workers", "2")
    assert (tmp_path / "serial" / "000000.tar").read_bytes() == (tmp_path / "parallel" / "000000.tar").read_bytes()


def test_images_only(folders, tmp_path):
    images, _, _ = folders
    out = tmp_path / "out"
    assert run("--images", str(images), "--out", str(out)) == 0
    samples = read_tars(out)
    assert len(samples) == 10 and not any("label.png" in s for s in samples.values())
    index = json.loads((out / "index.json").read_text())
    assert not index["has_labels"] and index["num_classes"] is None


def test_problems_are_reported_and_counted(folders, tmp_path, capsys):
    images, labels, _ = folders
    (labels / "a.png").unlink()  # missing partner
    write_file(labels / "b.png", b"not a png")  # unreadable partner
    write_file(images / "c.png", b"\x89PNG\r\n\x1a\n broken")  # undecodable image
    write_file(labels / "d.png", encode_image(np.zeros((5, 5), dtype=np.uint8)))  # size mismatch
    label = np.asarray(Image.open(labels / "e.png")).copy()
    label[1, 1] = 9
    write_file(labels / "e.png", encode_image(label))  # out of range for --num-classes 4
    write_file(labels / "orphan.png", encode_image(np.zeros((5, 5), dtype=np.uint8)))  # label without image
    out = tmp_path / "out"
    code = run("--images", str(images), "--labels", str(labels), "--out", str(out), "--num-classes", "4")
    assert code == 0
    err = capsys.readouterr().err.splitlines()
    assert any(str(images / "a.jpg") in line and "missing_label" in line for line in err)
    assert any(str(labels / "b.png") in line and "unreadable_label" in line for line in err)
    assert any(str(images / "c.png") in line and "undecodable_image" in line for line in err)
    assert any(str(labels / "d.png") in line and "label_size_mismatch" in line for line in err)
    assert any(str(labels / "e.png") in line and "label_out_of_range" in line and "9" in line for line in err)
    assert any(str(labels / "orphan.png") in line and "label_without_image" in line for line in err)
    assert len(err) == 6
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == {
        "label_out_of_range": 1,
        "label_size_mismatch": 1,
        "label_without_image": 1,
        "missing_label": 1,
        "undecodable_image": 1,
        "unreadable_label": 1,
    }
    assert index["num_samples"] == 5 and index["num_skipped"] == 6
    assert set(read_tars(out)) == {"f", "g", "sub__dir__h", "x_y", "sub__k"}


def test_nothing_written_is_a_user_error_with_exit_status_2(tmp_path, capsys):
    write_file(tmp_path / "images" / "a.png", b"garbage")
    with pytest.raises(UserError, match=re.escape(f"no sample was written to {tmp_path / 'out'} (1 skipped")):
        run("--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.tar"))
    capsys.readouterr()
    assert cli_main(["make-shards", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no sample was written to") and "Traceback" not in "\n".join(err)


def test_user_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="--images .*directory not found"):
        run("--images", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    write_file(tmp_path / "empty" / "notes.txt", b"hello")
    with pytest.raises(UserError, match="no images"):
        run("--images", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    # through the CLI: one line, exit status 2
    assert cli_main(["make-shards", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --images")


def _is_read_only(path: Path) -> bool:
    try:
        (path / ".primaps-probe").touch()
    except OSError:
        return True
    (path / ".primaps-probe").unlink()
    return False


def test_read_only_output_directory(folders, tmp_path):
    images, _, _ = folders
    target = tmp_path / "readonly"
    target.mkdir()
    target.chmod(0o555)
    if not _is_read_only(target):  # root ignores permission bits; /sys is mounted read-only
        target = Path("/sys/fs")
        if not target.is_dir() or not _is_read_only(target):
            pytest.skip("no read-only directory available")
    with pytest.raises(UserError, match=f"output directory {target}.* not writable"):
        run("--images", str(images), "--out", str(target))


def test_stale_shards_of_an_earlier_run_are_removed(folders, tmp_path):
    images, labels, _ = folders
    out = tmp_path / "out"
    run("--images", str(images), "--labels", str(labels), "--out", str(out), "--shard-size", "2")
    assert len(list(out.glob("*.tar"))) == 5
    run("--images", str(images), "--labels", str(labels), "--out", str(out), "--shard-size", "4")
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    assert not list(out.glob(".*partial"))


def test_cityscapes_layout(tmp_path):
    root = tmp_path / "cityscapes"
    raw = np.zeros((8, 12), dtype=np.uint8)
    raw[:, 4:8] = 7  # road
    raw[:, 8:] = 33  # bicycle
    for city, name in (("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019")):
        write_file(root / "leftImg8bit/train" / city / f"{name}_leftImg8bit.png", encode_image(np.zeros((8, 12, 3), np.uint8)))
        write_file(root / "gtFine/train" / city / f"{name}_gtFine_labelIds.png", encode_image(raw))
        write_file(root / "gtFine/train" / city / f"{name}_gtFine_color.png", encode_image(np.zeros((8, 12, 3), np.uint8)))
        write_file(root / "gtFine/train" / city / f"{name}_gtFine_instanceIds.png", encode_image(raw))
    out = tmp_path / "out"
    code = run(
        "--images", str(root / "leftImg8bit/train"), "--labels", str(root / "gtFine/train"),
        "--out", str(out), "--preset", "cityscapes",
    )  # fmt: skip
    assert code == 0
    samples = read_tars(out)
    assert set(samples) == {"aachen__aachen_000000_000019_leftImg8bit", "bonn__bonn_000001_000019_leftImg8bit"}
    label = np.asarray(Image.open(io.BytesIO(samples["bonn__bonn_000001_000019_leftImg8bit"]["label.png"])))
    assert label[0].tolist() == [255] * 4 + [0] * 4 + [26] * 4
    index = json.loads((out / "index.json").read_text())
    assert index["preset"] == "cityscapes" and index["num_classes"] == 27 and index["class_names"][0] == "road"
    assert index["num_skipped"] == 0


def test_cocostuff_layout(tmp_path):
    root = tmp_path / "cocostuff"
    write_file(root / "images/val2017/000000000139.jpg", encode_image(np.zeros((6, 6, 3), np.uint8), "JPEG"))
    write_file(root / "annotations/val2017/000000000139.png", encode_image(np.array([[0, 91, 181, 255, 119, 1]] * 6, np.uint8)))
    out = tmp_path / "out"
    assert run("--images", str(root / "images"), "--labels", str(root / "annotations"), "--out", str(out), "--preset", "cocostuff") == 0
    sample = read_tars(out)["val2017__000000000139"]
    assert "jpg" in sample
    assert np.asarray(Image.open(io.BytesIO(sample["label.png"])))[0].tolist() == [9, 17, 24, 255, 26, 11]


def test_potsdam_mat_tiles(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "potsdam"
    image = np.random.default_rng(0).integers(0, 255, size=(5, 7, 4), dtype=np.uint8)  # R, G, B, IR
    gt = np.array([[0, 1, 2, 3, 4, 5, 255]] * 5, dtype=np.uint8)
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    savemat(root / "imgs/tile_1.mat", {"img": image})
    savemat(root / "gt/tile_1.mat", {"gt": gt})
    out = tmp_path / "out"
    assert run("--images", str(root / "imgs"), "--labels", str(root / "gt"), "--out", str(out), "--preset", "potsdam") == 0
    sample = read_tars(out)["tile_1"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), image[..., :3])
    assert np.asarray(Image.open(io.BytesIO(sample["label.png"])))[0].tolist() == [0, 1, 2, 2, 0, 1, 255]


def test_shards_read_back_through_the_loader(folders, tmp_path):
    import torch

    from primaps_dist.config import DataConfig
    from primaps_dist.data.loader import make_eval_loader

    images, labels, expected = folders
    out = tmp_path / "out"
    run("--images", str(images), "--labels", str(labels), "--out", str(out), "--shard-size", "3")
    cfg = DataConfig(val_shards=str(out), num_classes=4, crop_size=16, num_workers=0, eval_batch_size=4)
    keys, labels_seen = [], set()
    for batch in make_eval_loader(cfg, rank=0, world_size=1):
        keys.extend(batch["key"])
        labels_seen |= set(torch.unique(batch["label"]).tolist())
    assert len(keys) == 10 and labels_seen <= {0, 1, 2, 3, 255}


def test_resize_short_stores_small_jpegs_with_aligned_labels(tmp_path):
    """--resize-short 48: a 192 x 96 PNG and its label are stored as a 96 x 48 JPEG and a 96 x 48 label; the
    label's left and right halves keep their ids, the picture its colours (up to JPEG error)."""
    import io
    import tarfile

    from PIL import Image

    from primaps_dist.data import shards as make_shards

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    picture = np.zeros((96, 192, 3), dtype=np.uint8)
    picture[:, 96:] = (200, 40, 40)
    Image.fromarray(picture).save(images / "a.png")
    label = np.zeros((96, 192), dtype=np.uint8)
    label[:, 96:] = 1
    Image.fromarray(label).save(labels / "a.png")
    out = tmp_path / "out"
    assert make_shards.main(["--images", str(images), "--labels", str(labels), "--out", str(out), "--num-classes", "2",
                             "--resize-short", "48", "--quality", "85"]) == 0
    with tarfile.open(out / "000000.tar") as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    assert sorted(members) == ["a.jpg", "a.label.png"]
    stored = np.asarray(Image.open(io.BytesIO(members["a.jpg"])))
    stored_label = np.asarray(Image.open(io.BytesIO(members["a.label.png"])))
    assert stored.shape == (48, 96, 3) and stored_label.shape == (48, 96)
    assert (stored_label[:, :48] == 0).all() and (stored_label[:, 48:] == 1).all()
    assert abs(int(stored[:, 60:, 0].mean()) - 200) < 8 and int(stored[:, :40].max()) < 20
    index = json.loads((out / "index.json").read_text())
    assert index["resize_short"] == 48 and index["image_size"]["histogram"] == {"96x48": 1}
