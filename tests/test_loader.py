"""Loaders: shard specs, node/worker splitting, determinism and resume, corrupt data, conversions."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from primaps_dist.config import DataConfig
from primaps_dist.data.loader import collect_state, make_eval_loader, make_train_loader, merge_states
from primaps_dist.data.order import eval_ranges, shard_sample_counts
from primaps_dist.data.shardio import ShardProblem, read_shard, resolve_shards
from primaps_dist.data.synthetic import CLASS_COLOURS, encode_image, write_striped_shards, write_tar
from primaps_dist.errors import ConfigError, UserError

torch.set_num_threads(1)

CROP = 32


def data_cfg(train: str = "", val: str = "", **overrides) -> DataConfig:
    values = dict(
        train_shards=train,
        val_shards=val,
        num_classes=4,
        crop_size=CROP,
        train_scale=[1.0, 1.5],
        batch_size=4,
        eval_batch_size=3,
        num_workers=0,
        shuffle_buffer=8,
        max_corrupt_fraction=0.5,
    )
    values.update(overrides)
    return DataConfig(**values)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_striped_shards(tmp_path_factory.mktemp("shards"), num_shards=5, per_shard=7, size=(40, 52))


@pytest.fixture(scope="module")
def shard_dir(shards) -> str:
    return os.path.dirname(shards[0])


def take(loader, count: int) -> list[dict]:
    return [next(loader) for _ in range(count)]


# ------------------------------------------------------------------------------------------ shard specs


def test_resolve_shards_directory_glob_brace_and_list(shard_dir, shards):
    assert resolve_shards(shard_dir, "data.train_shards") == shards
    assert resolve_shards(os.path.join(shard_dir, "*.tar"), "k") == shards
    assert resolve_shards(os.path.join(shard_dir, "{000001..000003}.tar"), "k") == shards[1:4]
    assert resolve_shards(f"{shards[4]},{shards[0]}", "k") == [shards[4], shards[0]]


def test_resolve_shards_errors_name_the_config_key(tmp_path, shard_dir):
    with pytest.raises(ConfigError, match="data.train_shards.*matches no .tar shards"):
        resolve_shards(str(tmp_path / "*.tar"), "data.train_shards")
    with pytest.raises(ConfigError, match="data.val_shards.*not found"):
        resolve_shards(os.path.join(shard_dir, "{000003..000009}.tar"), "data.val_shards")
    with pytest.raises(ConfigError, match="data.val_shards.*empty"):
        resolve_shards("", "data.val_shards")
    with pytest.raises(ConfigError, match="data.train_shards"):
        make_train_loader(data_cfg(str(tmp_path)), rank=0, world_size=1, seed=0)
    with pytest.raises(ConfigError, match="data.val_shards"):
        make_eval_loader(data_cfg(val=str(tmp_path / "nothing-*.tar")), rank=0, world_size=1)


# ------------------------------------------------------------------------------------------ evaluation split


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 2), (64, 3)])
def test_eval_split_is_a_balanced_partition_of_samples(world_size, num_workers):
    counts = [500, 0, 7, 3]  # one big shard: every rank still gets its share
    seen = []
    per_rank = []
    for rank in range(world_size):
        ranges = eval_ranges(counts, rank, world_size, num_workers)
        per_rank.append(sum(end - start for start, end in ranges))
        seen.extend(p for start, end in ranges for p in range(start, end))
    assert sorted(seen) == list(range(sum(counts)))
    assert max(per_rank) - min(per_rank) <= 1


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 1), (2, 2), (3, 2), (5, 2)])
def test_eval_sees_every_sample_exactly_once(shard_dir, world_size, num_workers):
    cfg = data_cfg(val=shard_dir, num_workers=num_workers)
    keys, counts = [], []
    for rank in range(world_size):
        loader = make_eval_loader(cfg, rank=rank, world_size=world_size)
        rank_keys = []
        for batch in loader:
            assert batch["image"].shape[1:] == (3, CROP, CROP) and batch["image"].dtype == torch.float32
            assert batch["label"].shape == (len(batch["key"]), CROP, CROP) and batch["label"].dtype == torch.int64
            rank_keys.extend(batch["key"])
        assert loader.num_samples == len(rank_keys)
        keys.extend(rank_keys)
        counts.append(len(rank_keys))
    assert max(counts) - min(counts) <= 1  # split by samples, not shards
    assert len(keys) == 35
    assert sorted(keys) == sorted(f"s{s}_{i:04d}" for s in range(5) for i in range(7))


def test_eval_ranks_share_a_single_shard(shards):
    """One shard of 7 samples on 3 ranks x 2 workers: 2, 2 and 3 samples, none twice (a whole-shard split
    would leave two ranks idle)."""
    cfg = data_cfg(val=shards[0], num_workers=2)
    keys = []
    for rank in range(3):
        loader = make_eval_loader(cfg, rank=rank, world_size=3)
        rank_keys = [k for batch in loader for k in batch["key"]]
        assert len(rank_keys) == loader.num_samples == [2, 2, 3][rank]
        keys.extend(rank_keys)
    assert sorted(keys) == [f"s0_{i:04d}" for i in range(7)]


def test_eval_order_is_fixed_and_centre_crop(shard_dir):
    cfg = data_cfg(val=shard_dir, num_workers=2)
    first = [b for b in make_eval_loader(cfg, rank=0, world_size=1)]
    second = [b for b in make_eval_loader(cfg, rank=0, world_size=1)]
    assert [b["key"] for b in first] == [b["key"] for b in second]
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"])


def test_eval_label_ids_out_of_range_raise_user_error(tmp_path):
    label = np.full((36, 36), 2, dtype=np.uint8)
    label[0, 0] = 9
    image = np.zeros((36, 36, 3), dtype=np.uint8)
    write_tar(tmp_path / "000000.tar", [("bad.png", encode_image(image)), ("bad.label.png", encode_image(label))])
    loader = make_eval_loader(data_cfg(val=str(tmp_path)), rank=0, world_size=1)
    with pytest.raises(UserError, match=r"000000.tar key bad: label ids \[9\]"):
        list(loader)


def test_eval_resize_short_must_cover_the_crop(shard_dir):
    with pytest.raises(ConfigError, match="eval.resize_short"):
        make_eval_loader(data_cfg(val=shard_dir), rank=0, world_size=1, resize_short=CROP - 1)


# ------------------------------------------------------------------------------------------ training streams


def test_train_batches_have_the_documented_layout(shard_dir):
    loader = make_train_loader(data_cfg(shard_dir), rank=0, world_size=1, seed=0)
    batch = next(loader)
    assert batch["image"].shape == (4, 3, CROP, CROP) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (4, CROP, CROP) and batch["label"].dtype == torch.int64
    assert bool((batch["label"] == 255).all()), "training skips labels unless asked"
    assert len(batch["key"]) == 4 and batch["skipped"] == 0
    assert torch.equal(batch["sample_index"], torch.arange(4))  # step 0's places in the global sequence
    assert torch.equal(next(loader)["sample_index"], torch.arange(4, 8))
    labelled = next(make_train_loader(data_cfg(shard_dir), rank=0, world_size=1, seed=0, with_labels=True))
    assert int(labelled["label"].max()) < 4
    assert torch.equal(labelled["image"], batch["image"]), "labels do not change the image stream"


def test_same_seeds_reproduce_and_streams_differ(shard_dir):
    cfg = data_cfg(shard_dir)
    keys = lambda loader: [k for b in take(loader, 6) for k in b["key"]]  # noqa: E731
    base = keys(make_train_loader(cfg, rank=0, world_size=2, seed=3))
    assert base == keys(make_train_loader(cfg, rank=0, world_size=2, seed=3))
    assert base != keys(make_train_loader(cfg, rank=1, world_size=2, seed=3))
    assert base != keys(make_train_loader(cfg, rank=0, world_size=2, seed=4))
    assert base != keys(make_train_loader(cfg, rank=0, world_size=2, seed=3, start_step=100))


def _global_batches(cfg, world_size: int, steps: int, **options) -> list[tuple[list[str], torch.Tensor]]:
    """Each step's batches of all ranks, concatenated in rank order: (keys, images); checks on the way that each
    global batch's ``sample_index`` is ``t * G + [0, G)`` (the places of step t, the same on any W)."""
    loaders = [make_train_loader(cfg, rank=rank, world_size=world_size, seed=11, **options)
               for rank in range(world_size)]
    out = []
    for _ in range(steps):
        batches = [next(loader) for loader in loaders]
        assert {len(b["key"]) for b in batches} == {cfg.global_batch_size // world_size}
        step = batches[0]["state"]["step"] - 1  # 0-based step of this batch
        index = torch.cat([b["sample_index"] for b in batches])
        assert index.dtype == torch.int64
        assert torch.equal(index, torch.arange(step * cfg.global_batch_size, (step + 1) * cfg.global_batch_size))
        out.append(([k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches])))
    for loader in loaders:
        loader.close()
    return out


def test_global_batches_do_not_depend_on_ranks_or_workers(shard_dir):
    """The elastic guarantee at the data level: W = 1, 2, 4 ranks with 0 or 2 workers see the same global
    batches, bitwise, the ranks' batches being contiguous blocks of it."""
    cfg = data_cfg(shard_dir, global_batch_size=8, shuffle_buffer=16)
    reference = _global_batches(cfg, 1, 5)
    for world_size, num_workers in ((2, 0), (4, 2), (1, 2)):
        other = _global_batches(replace(cfg, num_workers=num_workers), world_size, 5)
        for (keys, images), (other_keys, other_images) in zip(reference, other):
            assert keys == other_keys and torch.equal(images, other_images)
    assert len({k.split("_")[0] for k in reference[0][0]}) >= 3  # every batch mixes shards


def test_streams_of_one_epoch_read_different_samples(shard_dir):
    """8 streams, 5 shards of 7: each shard is split into two ranges (3 and 4 samples), so the first three global
    batches (every stream still in its first range) hold 24 different samples."""
    cfg = data_cfg(shard_dir, global_batch_size=8, shuffle_buffer=0)
    keys = [k for keys, _ in _global_batches(cfg, 1, 3) for k in keys]
    assert len(keys) == 24 and len(set(keys)) == 24


def test_global_batch_must_divide(shard_dir):
    with pytest.raises(ConfigError, match="data.global_batch_size.*not divisible by the number of ranks 3"):
        make_train_loader(data_cfg(shard_dir, global_batch_size=8), rank=0, world_size=3, seed=0)
    with pytest.raises(ConfigError, match="data.streams"):
        make_train_loader(data_cfg(shard_dir, global_batch_size=8, streams=2), rank=0, world_size=4, seed=0)


def test_train_stream_is_infinite_and_resamples(shard_dir):
    loader = make_train_loader(data_cfg(shard_dir, batch_size=7), rank=0, world_size=1, seed=0)
    keys = [k for b in take(loader, 12) for k in b["key"]]  # 84 draws from 35 samples
    assert len(keys) == 84 and len(set(keys)) == 35


def test_emission_order_is_a_bounded_shuffle():
    from primaps_dist.data.order import emission_order

    for capacity in (1, 4, 50):
        order = emission_order(30, capacity, np.random.default_rng(3))
        assert sorted(order.tolist()) == list(range(30))
        assert all(item <= position + capacity - 1 for position, item in enumerate(order.tolist()))
        again = emission_order(30, capacity, np.random.default_rng(3))
        assert np.array_equal(order, again)
    assert emission_order(30, 1, np.random.default_rng(0)).tolist() == list(range(30))
    assert emission_order(30, 8, np.random.default_rng(0)).tolist() != list(range(30))


def test_sample_counts_from_index_or_tar_headers(shards, tmp_path):
    assert shard_sample_counts(shards) == [7] * 5
    import json
    import shutil

    copy = tmp_path / "000000.tar"
    shutil.copy(shards[0], copy)
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": "000000.tar", "num_samples": 9}]}))
    assert shard_sample_counts([str(copy)]) == [9]  # the index wins (it is the listing for remote data)


@pytest.mark.parametrize("num_workers,stop,resume_world", [(0, 4, 1), (2, 3, 4), (2, 4, 2)])
def test_resume_reproduces_the_uninterrupted_stream(shard_dir, num_workers, stop, resume_world):
    """Stopped at W = 2 after ``stop`` steps, resumed at another W: the same global batches, bitwise."""
    cfg = data_cfg(shard_dir, num_workers=num_workers, shuffle_buffer=20, global_batch_size=4)
    total = 9
    reference = _global_batches(cfg, 1, total)
    states = []
    for rank in range(2):
        loader = make_train_loader(cfg, rank=rank, world_size=2, seed=11)
        state = None
        for batch in take(loader, stop):
            state = collect_state(batch, state)
        loader.close()
        assert state["step"] == stop
        states.append(state)
    merged = merge_states(states)
    assert len(merged["positions"]) == 4  # one position per logical stream, none per rank
    loaders = [make_train_loader(cfg, rank=rank, world_size=resume_world, seed=11, start_step=stop,
                                 resume_state=merged) for rank in range(resume_world)]
    assert all(loader.resumed for loader in loaders)
    for step, (keys, images) in enumerate(reference[stop:], start=stop):
        batches = [next(loader) for loader in loaders]
        assert [k for b in batches for k in b["key"]] == keys
        assert torch.equal(torch.cat([b["sample_index"] for b in batches]), torch.arange(4 * step, 4 * step + 4))
        assert torch.equal(torch.cat([b["image"] for b in batches]), images)  # bitwise
    for loader in loaders:
        loader.close()


def test_resume_state_of_another_stream_is_ignored(shard_dir, caplog):
    cfg = data_cfg(shard_dir)
    state = None
    for batch in take(make_train_loader(cfg, rank=0, world_size=1, seed=0), 2):
        state = collect_state(batch, state)
    with caplog.at_level(logging.WARNING, logger="primaps_dist.data"):
        loader = make_train_loader(cfg, rank=0, world_size=1, seed=1, start_step=2, resume_state=state)
    assert not loader.resumed and loader.salt == 2
    assert "seed" in caplog.text


def test_collect_state_is_small_and_pure(shard_dir):
    batch = next(make_train_loader(data_cfg(shard_dir), rank=0, world_size=1, seed=0))
    first = collect_state(batch)
    second = collect_state(batch, first)
    assert first["step"] == 1 and second == first and second is not first
    import json

    assert json.loads(json.dumps(second)) == second


# ------------------------------------------------------------------------------------------ image conversion


def _single_sample_shard(tmp_path, image: np.ndarray, label: np.ndarray | None = None, fmt="PNG", **options) -> str:
    ext = "jpg" if fmt == "JPEG" else "png"
    members = [(f"one.{ext}", encode_image(image, fmt, **options))]
    if label is not None:
        members.append(("one.label.png", encode_image(label)))
    write_tar(tmp_path / "000000.tar", members)
    return str(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_other_image_modes_become_rgb(tmp_path, mode):
    from io import BytesIO

    from PIL import Image

    from primaps_dist.data.synthetic import write_tar as write

    grey = np.tile(np.linspace(0, 250, 40, dtype=np.uint8), (40, 1))
    if mode == "I;16":
        picture = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode == "P":
        picture = Image.fromarray(grey)
        picture.putpalette([v for i in range(256) for v in (i, i, i)])  # L -> P with a grey palette
        assert picture.mode == "P"
    else:
        picture = Image.fromarray(np.stack([grey] * 3, -1)).convert(mode)
    buffer = BytesIO()
    picture.save(buffer, format="PNG")
    write(tmp_path / "000000.tar", [("one.png", buffer.getvalue())])
    batch = next(iter(make_eval_loader(data_cfg(val=str(tmp_path)), rank=0, world_size=1)))
    image = batch["image"][0]
    assert image.shape == (3, CROP, CROP)
    assert torch.allclose(image[0], image[1], atol=1 / 255) and torch.allclose(image[1], image[2], atol=1 / 255)
    assert float(image[0, :, -1].mean()) > float(image[0, :, 0].mean()) + 0.5  # the gradient survived


def test_images_smaller_than_the_crop_are_upscaled(tmp_path):
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    image[:, 10:] = 200
    label = np.zeros((10, 20), dtype=np.uint8)
    label[:, 10:] = 1
    path = _single_sample_shard(tmp_path, image, label)
    batch = next(iter(make_eval_loader(data_cfg(val=path), rank=0, world_size=1)))
    assert batch["image"].shape == (1, 3, CROP, CROP) and batch["label"].shape == (1, CROP, CROP)
    cfg = data_cfg(path, batch_size=2)
    train = next(make_train_loader(cfg, rank=0, world_size=1, seed=0, with_labels=True))
    assert train["image"].shape == (2, 3, CROP, CROP)
    assert set(train["label"].unique().tolist()) <= {0, 1}


def test_labels_stay_aligned_through_scale_crop_and_flip(shard_dir):
    cfg = data_cfg(shard_dir, train_scale=[1.0, 2.0], batch_size=8)
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=5, with_labels=True)
    colours = torch.as_tensor(CLASS_COLOURS[:4], dtype=torch.float32) / 255.0  # [4, 3]
    agree = total = 0
    for batch in take(loader, 4):
        pixels = batch["image"].permute(0, 2, 3, 1).reshape(-1, 1, 3)
        nearest = ((pixels - colours[None]) ** 2).sum(-1).argmin(-1)
        agree += int((nearest == batch["label"].reshape(-1)).sum())
        total += nearest.numel()
    assert agree / total > 0.99  # only pixels on band borders may disagree (measured: about 0.1 %)


def test_jpeg_decodes_at_reduced_scale_deterministically(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(256, 300, 3), dtype=np.uint8)
    path = _single_sample_shard(tmp_path, image, fmt="JPEG", quality=90)
    first = next(iter(make_eval_loader(data_cfg(val=path), rank=0, world_size=1)))["image"]
    second = next(iter(make_eval_loader(data_cfg(val=path), rank=0, world_size=1)))["image"]
    assert first.shape == (1, 3, CROP, CROP) and torch.equal(first, second)


# ------------------------------------------------------------------------------------------ corrupt data


@pytest.fixture()
def corrupt_dir(tmp_path) -> str:
    """One good shard (6 samples), one with 2 bad samples among 4 good, one truncated, one empty."""
    write_striped_shards(tmp_path, num_shards=1, per_shard=6, size=(36, 36))
    good = encode_image(np.full((36, 36, 3), 90, dtype=np.uint8))
    jpeg = encode_image(np.full((36, 36, 3), 90, dtype=np.uint8), "JPEG")
    write_tar(
        tmp_path / "000001.tar",
        [
            ("a.png", good),
            ("broken.jpg", jpeg[: len(jpeg) // 3]),  # corrupt JPEG
            ("b.png", good),
            ("text.txt", b"not an image"),  # non-image member
            ("c.png", good),
            ("d.png", good),
        ],
    )
    write_tar(tmp_path / "full.tar", [(f"t{i}.png", good) for i in range(3)])
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "000002.tar").write_bytes(data[: 512 + len(good) // 2])  # truncated inside the first member
    (tmp_path / "full.tar").unlink()
    (tmp_path / "000003.tar").write_bytes(b"")  # empty shard
    return str(tmp_path)


def test_read_shard_reports_problems_instead_of_raising(corrupt_dir):
    items = list(read_shard(os.path.join(corrupt_dir, "000002.tar")))
    assert len(items) == 1 and isinstance(items[0], ShardProblem) and "truncated" in items[0].reason
    items = list(read_shard(os.path.join(corrupt_dir, "000003.tar")))
    assert len(items) == 1 and "empty" in items[0].reason
    items = list(read_shard(os.path.join(corrupt_dir, "000001.tar")))
    assert [i["__key__"] for i in items] == ["a", "broken", "b", "text", "c", "d"]


def test_truncation_on_a_member_boundary_is_detected(tmp_path):
    good = encode_image(np.zeros((8, 8, 3), dtype=np.uint8))
    write_tar(tmp_path / "full.tar", [("a.png", good), ("b.png", good)])
    data = (tmp_path / "full.tar").read_bytes()
    blocks = (len(good) + 511) // 512
    (tmp_path / "cut.tar").write_bytes(data[: 512 * (1 + blocks)])  # exactly after member a
    items = list(read_shard(str(tmp_path / "cut.tar")))
    assert isinstance(items[-1], ShardProblem) and "no end-of-archive" in items[-1].reason
    assert [i["__key__"] for i in items if isinstance(i, dict)] == []  # the last sample may be partial: dropped


def test_eval_counts_corrupt_samples(corrupt_dir):
    loader = make_eval_loader(data_cfg(val=corrupt_dir, max_corrupt_fraction=1.0), rank=0, world_size=1)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted([f"s0_{i:04d}" for i in range(6)] + ["a", "b", "c", "d"])
    # broken jpeg + text member + truncated shard + empty shard
    assert loader.skipped == 4


def test_train_counts_corrupt_samples(corrupt_dir):
    """One stream reads the four shards of an epoch one after the other: two batches of 5 are exactly the 10
    good samples, and the unusable items met on the way (broken jpeg, text member, truncated shard and its
    missing sample, empty shard) are counted, the same with 0 or 2 workers."""
    results = []
    for num_workers in (0, 2):
        cfg = data_cfg(corrupt_dir, max_corrupt_fraction=1.0, num_workers=num_workers, global_batch_size=5,
                       streams=1)
        loader = make_train_loader(cfg, rank=0, world_size=1, seed=0)
        batches = take(loader, 2)
        loader.close()
        keys = [k for b in batches for k in b["key"]]
        assert sorted(keys) == sorted([f"s0_{i:04d}" for i in range(6)] + ["a", "b", "c", "d"])
        skipped = sum(b["skipped"] for b in batches)
        assert 2 <= skipped <= 5
        results.append((keys, skipped))
    assert results[0] == results[1]


def test_too_many_corrupt_samples_raise_naming_the_shard(tmp_path):
    good = encode_image(np.zeros((36, 36, 3), dtype=np.uint8))
    members = []
    for i in range(60):
        members.append((f"k{i}.png", good if i % 3 == 0 else b"garbage"))
    write_tar(tmp_path / "000000.tar", members)
    with pytest.raises(UserError, match=r"max_corrupt_fraction=0.1.*000000.tar"):
        take(make_train_loader(data_cfg(str(tmp_path), max_corrupt_fraction=0.1), rank=0, world_size=1, seed=0), 30)
    with pytest.raises(UserError, match=r"000000.tar"):
        list(make_eval_loader(data_cfg(val=str(tmp_path), max_corrupt_fraction=0.1, num_workers=1), rank=0, world_size=1))


def test_only_broken_shards_do_not_hang(tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"")
    (tmp_path / "000001.tar").write_bytes(b"\x00" * 100)
    cfg = data_cfg(str(tmp_path), max_corrupt_fraction=1.0)
    with pytest.raises(UserError, match="data.train_shards: no shard yields any sample"):
        next(make_train_loader(cfg, rank=0, world_size=1, seed=0))


def test_undecodable_samples_only_do_not_hang(tmp_path, monkeypatch):
    import primaps_dist.data.train_stream as stream_module

    monkeypatch.setattr(stream_module, "MAX_UNUSABLE_IN_A_ROW", 40)
    write_tar(tmp_path / "000000.tar", [(f"k{i}.png", b"garbage") for i in range(7)])
    cfg = data_cfg(str(tmp_path), max_corrupt_fraction=1.0)
    with pytest.raises(UserError, match=r"the last 40 in a row; shards with problems: .*000000.tar \(40\)"):
        next(make_train_loader(cfg, rank=0, world_size=1, seed=0))
