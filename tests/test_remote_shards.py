"""Remote shards against real servers on loopback: Python's http.server and moto's S3 server.

The reference is always the same shard read from the local disk: a remote read must give the same samples,
byte for byte, or count a problem; it never hands out part of a sample. Faults: server down at start, the
connection cut mid-shard (once: resumed; every time: given up with one line naming the URL), the server process
killed mid-shard and restarted, a 404 and a corrupt shard (counted like a corrupt local shard), wrong credentials
(one line, exit 2).
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from primaps_dist.config import DataConfig
from primaps_dist.data import remote_cache
from primaps_dist.data.shardio import ShardProblem, read_shard
from primaps_dist.data.sources import ShardRef, Transport, resolve_shards
from primaps_dist.data.synthetic import write_striped_shards
from primaps_dist.errors import ConfigError, UserError
from support.net import free_port
from support.object_servers import HttpServerProcess, HttpShardServer, S3Server

PER_SHARD = 6


def write_index(folder: Path, names: list[str] | None = None, counts: dict[str, int] | None = None) -> None:
    """make-shards' index.json for the ``.tar`` files of ``folder`` (sample counts from the tar headers)."""
    names = names or sorted(name for name in os.listdir(folder) if name.endswith(".tar"))
    entries = []
    for name in names:
        path = folder / name
        if counts and name in counts:
            samples = counts[name]
        else:
            with tarfile.open(path) as archive:
                samples = len({member.name.split(".")[0] for member in archive.getmembers()})
        entries.append({"name": name, "num_samples": samples, "num_bytes": path.stat().st_size if path.exists() else 0})
    (folder / "index.json").write_text(json.dumps({"format": "primaps-dist-shards/1", "shards": entries}))


def transport_cfg(**overrides) -> DataConfig:
    values = dict(train_shards="", val_shards="", num_classes=4, crop_size=32, train_scale=[1.0, 1.0],
                  batch_size=2, eval_batch_size=3, num_workers=0, shuffle_buffer=0, max_corrupt_fraction=0.5,
                  remote_retries=3, remote_backoff_s=0.05, remote_timeout_s=5.0)
    values.update(overrides)
    return DataConfig(**values)


def samples(items) -> list[dict]:
    """Samples without the ``__shard__`` entry (it names where they came from, which differs by source)."""
    return [{k: v for k, v in item.items() if k != "__shard__"} for item in items if isinstance(item, dict)]


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("remote_src")
    write_striped_shards(folder, num_shards=3, per_shard=PER_SHARD, size=(40, 48))
    write_index(folder)
    return folder


@pytest.fixture
def http(shard_folder):
    with HttpShardServer(shard_folder) as server:
        yield server
    remote_cache.clear_process_state()


# ------------------------------------------------------------------------------------------ listing


def test_http_folder_is_listed_by_its_index_and_reads_like_local(http, shard_folder):
    refs = resolve_shards(f"{http.url}/", transport_cfg())
    local = resolve_shards(str(shard_folder), transport_cfg())
    assert [ref.url for ref in refs] == [f"{http.url}/{os.path.basename(path)}" for path in local]
    assert [ref.n_samples for ref in refs] == [PER_SHARD] * 3 == [ref.n_samples for ref in local]
    assert [ref.n_bytes for ref in refs] == [os.path.getsize(path) for path in local]
    for ref, path in zip(refs, local):
        remote_items = list(read_shard(ref))
        assert not [item for item in remote_items if isinstance(item, ShardProblem)]
        assert samples(remote_items) == samples(read_shard(path))
    # the index itself, and brace-expanded URLs (checked one by one at start)
    assert resolve_shards(f"{http.url}/index.json", transport_cfg()) == refs
    braces = resolve_shards(f"{http.url}/{{000001..000002}}.tar", transport_cfg())
    assert braces == refs[1:] and [ref.n_bytes for ref in braces] == [ref.n_bytes for ref in refs[1:]]
    assert [ref.n_samples for ref in braces] == [PER_SHARD] * 2  # from the index.json beside them


def test_shard_refs_are_strings_and_pickle_with_their_transport(http):
    import pickle

    ref = resolve_shards(f"{http.url}/", transport_cfg(remote_retries=7))[0]
    copy = pickle.loads(pickle.dumps(ref))
    assert isinstance(copy, str) and copy == ref.url
    assert (copy.n_samples, copy.n_bytes, copy.transport.retries) == (ref.n_samples, ref.n_bytes, 7)


def test_missing_remote_files_are_one_line_naming_key_and_url(http, tmp_path):
    with pytest.raises(ConfigError, match=r"'data.val_shards': http.*/000003\.tar: not found \(404\) \(and 6 more\)$"):
        resolve_shards(f"{http.url}/{{000000..000009}}.tar", transport_cfg(), "data.val_shards")
    empty = tmp_path / "noindex"
    empty.mkdir()
    with HttpShardServer(empty) as bare:
        with pytest.raises(ConfigError, match=r"index\.json: not found \(404\); a remote folder needs"):
            resolve_shards(f"{bare.url}/", transport_cfg())


def test_server_down_at_start_is_retried_with_backoff_then_one_line_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/data/"
    begin = time.monotonic()
    with pytest.raises(UserError) as caught:
        resolve_shards(url, transport_cfg(remote_retries=3, remote_backoff_s=0.2), "data.train_shards")
    elapsed = time.monotonic() - begin
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"data.train_shards: {url}index.json: gave up after 3 attempts"), message
    assert elapsed >= 0.2 + 0.4  # two waits, the second one doubled


def test_gs_without_gcsfs_is_one_line_naming_the_key():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(ConfigError, match=r"^config key 'data.val_shards': gs://b/v/index.json: gs:// needs .*gcs"):
        resolve_shards("gs://b/v/", transport_cfg(), "data.val_shards")


def test_pipe_and_file_urls_read_like_local(shard_folder):
    path = str(shard_folder / "000001.tar")
    refs = resolve_shards(f"pipe:cat {path},file://{path}", transport_cfg())
    assert [ref.url for ref in refs] == [f"pipe:cat {path}", path]
    expected = samples(read_shard(path))
    assert samples(read_shard(refs[0])) == expected == samples(read_shard(refs[1]))
    with pytest.raises(ConfigError, match="command 'no-such-command-here' not found"):
        resolve_shards("pipe:no-such-command-here x", transport_cfg())
    failing = list(read_shard(f"pipe:cat {path}; exit 3"))
    assert isinstance(failing[-1], ShardProblem) and "exited with status 3" in failing[-1].reason


# ------------------------------------------------------------------------------------------ faults


def member_offsets(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as archive:
        return archive.getmembers()


@pytest.mark.parametrize("answer_ranges", [False, True], ids=["server-ignores-range", "range-resume"])
def test_connection_cut_mid_shard_is_retried_and_the_shard_is_complete(tmp_path, answer_ranges):
    """A 6 MB shard cut at 3 MB: the reader has handed out some MB by then and continues from there (a Range
    request, or the whole file again with the bytes already handed out dropped)."""
    from primaps_dist.data.synthetic import write_tar

    path = tmp_path / "000000.tar"
    write_tar(path, [(f"k{index}.bin", os.urandom(1 << 20)) for index in range(6)])
    with HttpShardServer(tmp_path) as http:
        http.answer_ranges = answer_ranges
        http.cuts["000000.tar"] = 3 << 20
        ref = resolve_shards(f"{http.url}/000000.tar", transport_cfg())[0]
        items = list(read_shard(ref))
        assert http.cuts_done == 1 and http.requests.count("000000.tar") == 2
        assert not [item for item in items if isinstance(item, ShardProblem)]
        assert samples(items) == samples(read_shard(str(path)))
        if answer_ranges:  # the second request asked for the rest only
            assert len(http.ranges) == 1 and 0 < int(http.ranges[0][1][len("bytes="):-1]) <= 3 << 20, http.ranges
        else:
            assert http.ranges == []
        # a plain URL (no listed size from an index) resumes the same way
        http.cuts["000000.tar"] = 2 << 20
        items = list(read_shard(f"{http.url}/000000.tar"))
        assert http.cuts_done == 2 and not [item for item in items if isinstance(item, ShardProblem)]
        assert samples(items) == samples(read_shard(str(path)))


def test_connection_cut_every_time_gives_up_and_never_hands_out_the_cut_sample(http, shard_folder, caplog,
                                                                               tmp_path):
    path = shard_folder / "000002.tar"
    members = member_offsets(path)
    keys = list(dict.fromkeys(member.name.split(".")[0] for member in members))
    cut_image = next(member for member in members if member.name.startswith(keys[3]))
    cut = cut_image.offset_data + cut_image.size // 2
    http.cut_once = False
    http.cuts["000002.tar"] = cut
    ref = resolve_shards(f"{http.url}/", transport_cfg(remote_retries=3))[2]
    with caplog.at_level("WARNING", logger="primaps_dist.data"):
        items = list(read_shard(ref))
    local = samples(read_shard(str(path)))
    # Only complete samples from before the cut, byte for byte, never the cut one: at most what a local file cut
    # there gives (fewer when the connection error arrives before bytes already received are read).
    truncated = tmp_path / "000002.tar"
    truncated.write_bytes(path.read_bytes()[:cut])
    from_truncated = samples(read_shard(str(truncated)))
    assert 1 <= len(from_truncated) <= 3 and from_truncated == local[: len(from_truncated)]
    got = samples(items)
    assert got == from_truncated[: len(got)]
    problems = [item for item in items if isinstance(item, ShardProblem)]
    assert len(problems) == 1 and items[-1] is problems[0]
    assert f"{http.url}/000002.tar: gave up after 3 attempts" in problems[0].reason
    gave_up = [record.getMessage() for record in caplog.records if "gave up" in record.getMessage()]
    assert len(gave_up) == 1 and "\n" not in gave_up[0] and f"{http.url}/000002.tar" in gave_up[0]


def test_404_and_corrupt_remote_shards_are_counted_like_corrupt_local_shards(tmp_path):
    from primaps_dist.data.loader import make_eval_loader

    folder = tmp_path / "data"
    write_striped_shards(folder, num_shards=2, per_shard=PER_SHARD, size=(40, 48))
    (folder / "000002.tar").write_bytes(os.urandom(3000))  # corrupt: not a tar at all
    write_index(folder, counts={"000002.tar": PER_SHARD})

    def evaluate(spec: str) -> tuple[list[str], int]:
        loader = make_eval_loader(transport_cfg(val_shards=spec), rank=0, world_size=1)
        keys = [key for batch in loader for key in batch["key"]]
        return keys, loader.skipped

    local_keys, local_skipped = evaluate(str(folder))
    assert local_skipped >= 1 and len(local_keys) == 2 * PER_SHARD
    with HttpShardServer(folder) as server:
        assert evaluate(f"{server.url}/") == (local_keys, local_skipped)
        # listed by the index but gone from the server: a 404 is one more unusable item, the rest is read
        write_index(folder, names=["000000.tar", "000001.tar", "000007.tar"], counts={"000007.tar": PER_SHARD})
        keys, skipped = evaluate(f"{server.url}/")
        assert keys == local_keys and skipped >= 1
        problems = [item for item in read_shard(f"{server.url}/000007.tar") if isinstance(item, ShardProblem)]
        assert [problem.reason for problem in problems] == ["cannot open shard (not found (404))"]


@pytest.mark.slow
def test_server_process_killed_mid_shard_and_restarted(tmp_path, caplog):
    """A 48 MB shard; the server dies after the first sample was handed out and comes back on the same port."""
    folder = tmp_path / "big"
    folder.mkdir()
    from primaps_dist.data.synthetic import write_tar

    members = [(f"k{index:03d}.bin", os.urandom(1 << 20)) for index in range(48)]
    write_tar(folder / "000000.tar", members)
    server = HttpServerProcess(folder).start()
    # Capture from the start: the read-ahead thread may log the failed read before the main thread reads on.
    with caplog.at_level("INFO", logger="primaps_dist.data"):
        try:
            reader = read_shard(f"{server.url}/000000.tar")
            first = next(reader)
            server.kill()  # the read-ahead holds at most a few MB: most of the shard is still to come
            restart = threading.Timer(0.3, server.start, kwargs={"wait": False})
            restart.start()
            rest = list(reader)
            restart.join()
        finally:
            server.kill()
    assert not [item for item in rest if isinstance(item, ShardProblem)]
    got = [first, *rest]
    assert [item["__key__"] for item in got] == [name.split(".")[0] for name, _ in members]
    assert all(item["bin"] == data for item, (_, data) in zip(got, members))
    assert any("read failed at byte" in record.getMessage() for record in caplog.records)  # it was retried


# ------------------------------------------------------------------------------------------ cache, prefetch


def test_cache_downloads_once_renames_atomically_and_evicts_least_recently_used(http, shard_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    shard_bytes = (shard_folder / "000000.tar").stat().st_size
    cfg = transport_cfg(cache_dir=str(cache_dir), cache_limit_gb=2.5 * shard_bytes / 2**30)
    refs = resolve_shards(f"{http.url}/", cfg)
    threads = [threading.Thread(target=lambda: list(read_shard(refs[0]))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert http.requests.count("000000.tar") == 1  # four readers at once, one download (the others waited)
    assert samples(read_shard(refs[0])) == samples(read_shard(str(shard_folder / "000000.tar")))
    assert http.requests.count("000000.tar") == 1  # served from the cache
    for ref in refs[1:]:
        list(read_shard(ref))
    cached = sorted(name for name in os.listdir(cache_dir) if not name.startswith("."))
    assert len(cached) == 2 and not any(name.endswith("000000.tar") for name in cached)  # oldest left
    assert not [name for name in os.listdir(cache_dir) if name.endswith(".partial")]


def _read_in_child(ref: ShardRef, results) -> None:
    results.put(len(samples(read_shard(ref))))


def test_cache_shared_by_processes_downloads_each_shard_once(http, tmp_path):
    """Ranks of a node share data.cache_dir: three processes open the same shard at once, one download."""
    import multiprocessing

    ref = resolve_shards(f"{http.url}/", transport_cfg(cache_dir=str(tmp_path / "cache")))[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_read_in_child, args=(ref, results)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert sorted(results.get(timeout=5) for _ in children) == [PER_SHARD] * 3
    assert http.requests.count("000001.tar") == 1


def test_a_download_that_fails_leaves_nothing_in_the_cache(http, tmp_path):
    cache_dir = tmp_path / "cache"
    http.cut_once = False
    http.cuts["000000.tar"] = 5000
    ref = resolve_shards(f"{http.url}/", transport_cfg(cache_dir=str(cache_dir), remote_retries=2))[0]
    items = list(read_shard(ref))
    assert len(items) == 1 and "gave up after 2 attempts" in items[0].reason
    assert [name for name in os.listdir(cache_dir) if name != ".locks"] == []  # no shard, no partial file


def test_prefetch_fills_the_cache_in_the_background(http, shard_folder, tmp_path):
    cfg = transport_cfg(cache_dir=str(tmp_path / "cache"))
    refs = resolve_shards(f"{http.url}/", cfg)
    remote_cache.prefetch_shards(refs[1:])
    deadline = time.monotonic() + 20
    cache = remote_cache.ShardCache(cfg.cache_dir, 2**30)
    while not all(os.path.exists(cache.path_for(ref.url)) for ref in refs[1:]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(http.requests) == ["000001.tar", "000002.tar", "index.json"]
    assert samples(read_shard(refs[2])) == samples(read_shard(str(shard_folder / "000002.tar")))
    assert sorted(http.requests) == ["000001.tar", "000002.tar", "index.json"]  # read from the prefetched copy


def test_prefetch_without_cache_hands_over_the_early_stream(http, shard_folder):
    refs = resolve_shards(f"{http.url}/", transport_cfg())
    remote_cache.prefetch_shards([refs[1]])
    assert samples(read_shard(refs[1])) == samples(read_shard(str(shard_folder / "000001.tar")))
    assert http.requests.count("000001.tar") == 1


def test_remote_stream_refuses_more_bytes_than_the_index_lists(http, shard_folder):
    size = (shard_folder / "000000.tar").stat().st_size
    ref = ShardRef(f"{http.url}/000000.tar", PER_SHARD, size - 1024, Transport(retries=2, backoff_s=0.01))
    items = list(read_shard(ref))
    assert isinstance(items[-1], ShardProblem) and "larger than the" in items[-1].reason


# ------------------------------------------------------------------------------------------ S3 (moto)


@pytest.fixture(scope="module")
def s3(shard_folder):
    server = S3Server().start()
    server.upload_folder(shard_folder, "data", "train")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    from s3fs import S3FileSystem

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    S3FileSystem.clear_instance_cache()  # credentials are read when a file system instance is made
    yield s3
    S3FileSystem.clear_instance_cache()
    remote_cache.clear_process_state()


@pytest.mark.slow
def test_s3_folder_glob_and_braces_read_like_local(s3_env, shard_folder):
    local = resolve_shards(str(shard_folder))
    listed = resolve_shards("s3://data/train/", transport_cfg())
    globbed = resolve_shards("s3://data/train/*.tar", transport_cfg())
    braces = resolve_shards("s3://data/train/{000000..000002}.tar", transport_cfg(s3_endpoint_url=s3_env.endpoint))
    expected = [f"s3://data/train/{os.path.basename(path)}" for path in local]
    assert listed == globbed == braces == expected
    assert [ref.n_samples for ref in listed] == [PER_SHARD] * 3
    assert [ref.n_bytes for ref in globbed] == [os.path.getsize(path) for path in local]
    for ref, path in zip(listed, local):
        assert samples(read_shard(ref)) == samples(read_shard(path))
    problems = [item for item in read_shard("s3://data/train/000009.tar") if isinstance(item, ShardProblem)]
    assert [problem.reason for problem in problems] == ["cannot open shard (not found (404))"]


@pytest.mark.slow
def test_s3_wrong_credentials_are_one_line_exit_2_before_anything_starts(s3, tmp_path):
    from support.demo import tiny_train_args
    from support.env import child_env
    from support.run import assert_one_line_error, module_command, run_command

    env = child_env(tmp_path, **s3.env(access_key="AKIAWRONGWRONGWRONG", secret_key="wrong"))
    result = run_command(module_command("primaps_dist.train",
                                        *tiny_train_args("s3://data/train/", tmp_path / "run", tracking=True)),
                         env=env, timeout=120)
    assert_one_line_error(result, "'data.train_shards'", "s3://data/train/index.json: access denied")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.describe()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ whole runs


@pytest.mark.slow
def test_training_reads_from_http_and_s3_and_ends_with_the_prototypes_of_the_local_run(demo_data, s3_env, tmp_path):
    """Train and final evaluation read remote shards; the stream does not depend on where the bytes come from."""
    from support.checkpoints import final_payload
    from support.demo import tiny_train_args
    from support.run import run_main_in_process

    def train(train_spec: str, val_spec: str, name: str) -> dict:
        out = tmp_path / name
        result = run_main_in_process("primaps_dist.train", tiny_train_args(train_spec, out, val_shards=val_spec))
        assert result.returncode == 0, result.describe()
        return final_payload(out, 2)

    local = train(str(demo_data.train_shards), str(demo_data.val_shards), "local")
    with HttpShardServer(demo_data.train_shards.parent) as server:
        over_http = train(f"{server.url}/train/", f"{server.url}/val/", "http")
        assert "train/000000.tar" in server.requests and "val/000000.tar" in server.requests
    s3_env.upload_folder(demo_data.train_shards, "demo", "train")
    s3_env.upload_folder(demo_data.val_shards, "demo", "val")
    over_s3 = train("s3://demo/train/", "s3://demo/val", "s3")
    assert torch.equal(over_http["prototypes"], local["prototypes"])
    assert torch.equal(over_s3["prototypes"], local["prototypes"])
    assert over_http["skipped_total"] == over_s3["skipped_total"] == local["skipped_total"] == 0


@pytest.mark.slow
def test_a_wrong_val_shards_path_stops_at_start_before_mlflow_or_the_backbone(demo_data, tmp_path):
    """One line naming the key and path, exit 2, no MLflow database created (no migration lines), no run folder."""
    from support.demo import tiny_train_args
    from support.env import child_env
    from support.run import assert_one_line_error, last_line, module_command, run_command

    missing = tmp_path / "val_typo"
    args = tiny_train_args(demo_data.train_shards, tmp_path / "run", val_shards=missing, tracking=True)
    result = run_command(module_command("primaps_dist.train", *args), env=child_env(tmp_path), timeout=120)
    assert_one_line_error(result, "'data.val_shards'", str(missing))
    assert [line for line in result.stderr.splitlines() if line.strip()] == [last_line(result.stderr)]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bench_streaming_local_vs_remote_prints_the_ratios(tmp_path):
    """The benchmark runs as ``make bench`` runs it (a script in its own process) and prints one row per source."""
    import re

    from support.env import PYTHON, REPO, child_env
    from support.run import run_checked

    result = run_checked([PYTHON, str(REPO / "bench" / "bench_streaming.py"), "--sections", "local_vs_remote",
                          "--shards", "2", "--per-shard", "4", "--size", "96x64", "--batches", "2", "--rounds", "1"],
                         env=child_env(tmp_path), cwd=tmp_path, timeout=300)
    for source in ("local", "http", "s3"):
        assert re.search(rf"^{re.escape(source)} +\d+\.\d +\d\.\d\d +\d+\.\d +\d\.\d\d$", result.stdout, re.M), \
            result.stdout
    assert re.search(r"^s3\+cache +\d+\.\d +\d\.\d\d$", result.stdout, re.M), result.stdout
    assert re.search(r"worst of the remote rows: \d\.\d\d \(target >= 0\.8\)", result.stdout), result.stdout


@pytest.mark.slow
def test_two_ranks_sharing_a_cache_dir_download_each_shard_once(demo_data, tmp_path):
    """torchrun, 2 ranks with a loader worker each, train and val from HTTP through one data.cache_dir: the run
    finishes, the server sends each shard at most once, the cache holds only complete shards."""
    from support.demo import tiny_train_args
    from support.env import child_env
    from support.run import run_checked, torchrun_command

    cache = tmp_path / "cache"
    with HttpShardServer(demo_data.train_shards.parent) as server:
        args = tiny_train_args(f"{server.url}/train/", tmp_path / "run", "data.num_workers=1",
                               f"data.cache_dir={cache}", val_shards=f"{server.url}/val/")
        run_checked(torchrun_command(2, "primaps_dist.train", *args), env=child_env(tmp_path), timeout=300)
        shards = [name for name in server.requests if name.endswith(".tar")]
        base = server.url
    assert shards and len(shards) == len(set(shards)), shards
    assert "val/000000.tar" in shards
    cached = sorted(os.listdir(cache))
    assert len([name for name in cached if name.endswith(".tar")]) == len(shards)
    assert not [name for name in cached if name.endswith(".partial")]
    layout = remote_cache.ShardCache(str(cache), 2**30)
    for name in shards:  # each cached copy is the whole shard
        copy = Path(layout.path_for(f"{base}/{name}"))
        assert copy.read_bytes() == (demo_data.train_shards.parent / name).read_bytes()
