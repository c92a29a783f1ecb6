"""Batch inference over WebDataset shards (python -m primaps_dist.predict --shards): two gloo ranks split the
shards and segment every sample exactly once, the maps equal the Segmenter's, reruns skip finished work, and
bad input is one line with exit status 2."""

import io
import shlex
import tarfile

import numpy as np
import pytest
from PIL import Image

from support.demo import write_shard
from support.env import REPO, child_env
from support.run import assert_one_line_error, run_checked, run_main_in_process, torchrun_command

pytestmark = pytest.mark.usefixtures("single_thread")


def shard_images(shards_dir) -> dict[str, np.ndarray]:
    """``{key: uint8 [H, W, 3]}`` of every sample, read with tarfile and PIL (not the package's reader)."""
    images = {}
    for shard in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, ext = member.name.partition(".")
                if ext in ("jpg", "jpeg", "png", "webp") and member.isfile():
                    with Image.open(io.BytesIO(archive.extractfile(member).read())) as image:
                        images[key] = np.array(image.convert("RGB"))
    return images


def output_maps(out_dir) -> list[tuple[str, np.ndarray]]:
    """``(key, label map)`` of every member of every output shard (duplicates kept, to be counted)."""
    found = []
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                assert member.name.endswith(".labels.png"), member.name
                with Image.open(io.BytesIO(archive.extractfile(member).read())) as image:
                    found.append((member.name.removesuffix(".labels.png"), np.array(image)))
    return found


@pytest.mark.slow
def test_two_ranks_segment_every_sample_once_and_a_rerun_skips_them(demo_checkpoint, demo_data, tmp_path):
    from primaps_dist import Segmenter

    out = tmp_path / "labels"
    # the README's batch line ("Use a trained model"), on this session's demo run and shards
    readme = (REPO / "README.md").read_text().split("## Use a trained model", 1)[1].split("\n## ", 1)[0]
    (line,) = [line for line in readme.splitlines() if line.startswith("torchrun ")]
    paths = {"demo_out/run/checkpoints/latest": str(demo_checkpoint / "latest"),
             "demo_out/shards/train": str(demo_data.train_shards), "demo_out/labels_shards": str(out)}
    words = [paths.get(word, word) for word in shlex.split(line)]
    assert words[:4] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m"] and set(paths.values()) <= set(words)
    command = torchrun_command(2, words[4], *words[5:])
    first = run_checked(command, env=child_env(tmp_path), timeout=300)
    assert "rank 0 of 2: 8 images from 2 shards" in first.output and "rank 1 of 2: 8 images from 2 shards" in first.output
    assert first.output.count("predict: 0img") == 1, first.output  # one progress bar: rank 0's
    expected = shard_images(demo_data.train_shards)
    found = output_maps(out)
    assert sorted(key for key, _ in found) == sorted(expected) and len(found) == 16  # each sample exactly once
    segmenter = Segmenter.from_checkpoint(demo_checkpoint, device="cpu")
    keys = sorted(expected)
    reference = dict(zip(keys, segmenter.segment([expected[k] for k in keys])))
    for key, labels in found:
        assert np.array_equal(labels, reference[key].numpy().astype(np.uint8)), key

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    second = run_checked(command, env=child_env(tmp_path), timeout=300)
    assert "segmented 0 images in 0 shards on 2 ranks" in second.output and "4 shards already finished" in second.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps


def test_png_output_resumes_inside_an_unfinished_shard(demo_checkpoint, demo_data, tmp_path):
    out = tmp_path / "pngs"
    argv = ["--checkpoint", str(demo_checkpoint), "--shards", str(demo_data.val_shards), "--out", str(out),
            "--format", "png"]
    first = run_main_in_process("primaps_dist.predict", argv)
    assert first.returncode == 0, first.describe()
    pngs = sorted(out.glob("*/*.png"))
    assert len(pngs) == 8 and len(list(out.glob("*/.complete"))) == 2
    with Image.open(pngs[0]) as image:
        kept = np.array(image)
    pngs[0].unlink()  # an interrupted run: one image missing, its shard not marked finished
    (pngs[0].parent / ".complete").unlink()
    second = run_main_in_process("primaps_dist.predict", argv)
    assert second.returncode == 0, second.describe()
    assert "segmented 1 images in 1 shards" in second.stdout and "1 shards already finished" in second.stdout
    assert "3 images already written" in second.stdout
    with Image.open(pngs[0]) as image:
        assert np.array_equal(np.array(image), kept)


def test_remote_shards_over_http_give_the_local_maps(demo_checkpoint, demo_data, tmp_path):
    """--shards takes the remote specs data.train_shards takes: an http folder with an index.json (its shards
    fetched from a loopback server) and an http brace pattern give the same PNGs as the local shards; the data
    section's transport settings apply (data.cache_dir keeps whole copies)."""
    from support.object_servers import HttpShardServer

    def pngs(spec: str, name: str, *overrides: str) -> dict[str, np.ndarray]:
        out = tmp_path / name
        result = run_main_in_process("primaps_dist.predict", ["--checkpoint", str(demo_checkpoint), "--shards", spec,
                                                              "--out", str(out), "--format", "png",
                                                              "data.remote_retries=1", *overrides])
        assert result.returncode == 0, result.describe()
        assert "segmented 8 images in 2 shards" in result.stdout, result.describe()
        found = {}
        for path in sorted(out.glob("*/*.png")):
            with Image.open(path) as image:
                found[f"{path.parent.name}/{path.name}"] = np.array(image)
        return found

    local = pngs(str(demo_data.val_shards), "local")
    assert len(local) == 8
    with HttpShardServer(demo_data.val_shards.parent) as server:
        for name, spec in (("folder", f"{server.url}/val/"), ("braces", f"{server.url}/val/{{000000..000001}}.tar")):
            server.requests.clear()
            remote = pngs(spec, name, f"data.cache_dir={tmp_path / name}_cache")
            assert sorted(remote) == sorted(local) and all(np.array_equal(remote[k], local[k]) for k in local), name
            assert {"val/000000.tar", "val/000001.tar"} <= set(server.requests), server.requests
            cached = sorted(p.stat().st_size for p in (tmp_path / f"{name}_cache").rglob("*") if p.is_file())
            sizes = sorted(p.stat().st_size for p in demo_data.val_shards.glob("*.tar"))
            assert all(size in cached for size in sizes), (cached, sizes)


def test_undecodable_samples_are_skipped_and_counted(demo_checkpoint, tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((70, 50, 3), np.uint8)).save(buffer, format="PNG")
    shard = write_shard(tmp_path / "in" / "000000.tar", [("good.png", buffer.getvalue()), ("bad.jpg", b"not a jpeg")])
    out = tmp_path / "out"
    result = run_main_in_process("primaps_dist.predict", ["--checkpoint", str(demo_checkpoint), "--shards", str(shard),
                                                          "--out", str(out)])
    assert result.returncode == 0, result.describe()
    assert "segmented 1 images" in result.stdout and "1 unreadable samples skipped" in result.stdout
    (found,) = output_maps(out)
    assert found[0] == "good" and found[1].shape == (70, 50)


@pytest.mark.parametrize("case", ["unknown_format", "empty_folder", "missing_shards"])
def test_bad_input_is_one_line(demo_checkpoint, tmp_path, case):
    if case == "unknown_format":
        source = tmp_path / "photo.xyz"
        source.write_bytes(b"\x00" * 10)
        args, needle = ["--images", str(source)], "unknown image format '.xyz'"
    elif case == "empty_folder":
        source = tmp_path / "empty"
        source.mkdir()
        (source / "notes.txt").write_text("no images here")
        args, needle = ["--images", str(source)], "no images"
    else:
        args, needle = ["--shards", str(tmp_path / "nothing" / "*.tar")], "--shards"
    result = run_main_in_process("primaps_dist.predict", ["--checkpoint", str(demo_checkpoint), *args,
                                                          "--out", str(tmp_path / "out")])
    assert_one_line_error(result, needle)
