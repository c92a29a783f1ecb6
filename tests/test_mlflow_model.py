"""The segmenter as an MLflow pyfunc model: saved from an export, logged at the end of training (and registered),
served by a real ``mlflow models serve`` on loopback, and a dead tracking server that neither stalls nor fails
training."""

import importlib.metadata
import json
import os
import re
import shlex
import time
import urllib.request
import warnings

import numpy as np
import pytest
import torch

from support.demo import CROP, NUM_CLASSES, tiny_train_args
from support.env import PYTHON, REPO, VENV_BIN, child_env
from support.net import free_port
from support.run import Background, module_command, run_checked, run_main_in_process, wait_until

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

pytestmark = pytest.mark.usefixtures("single_thread")


def images_batch(height=70, width=90, count=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(demo_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    result = run_main_in_process("primaps_dist.cli", ["export", "--checkpoint", str(demo_checkpoint), "--out", str(out)])
    assert result.returncode == 0, result.describe()
    return out


def test_register_model_is_validated():
    from primaps_dist.config import load_config
    from primaps_dist.errors import ConfigError

    assert load_config(None, ["tracking.register_model=primaps demo.v2"]).tracking.register_model == "primaps demo.v2"
    for bad in ("a/b", "x:1", "a*b"):
        with pytest.raises(ConfigError, match="'tracking.register_model'"):
            load_config(None, [f"tracking.register_model={bad}"])


def test_log_model_is_validated_and_false_skips_the_model(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from primaps_dist.config import load_config
    from primaps_dist.errors import ConfigError
    from primaps_dist.segmenter import publish
    from primaps_dist.segmenter.publish import log_segmenter_model

    assert load_config(None, []).tracking.log_model is True
    with pytest.raises(ConfigError, match="'tracking.log_model'"):
        load_config(None, ["tracking.log_model=sometimes"])
    with pytest.raises(ConfigError, match="'tracking.register_model'"):
        load_config(None, ["tracking.log_model=false", "tracking.register_model=primaps-demo"])
    logged = []
    tracker = SimpleNamespace(active=True, log_artifact=lambda *a: logged.append(a),
                              register_model=lambda *a: logged.append(a))
    built = []  # the model's first step; with log_model=true it is taken (and the stub makes the step fail)
    monkeypatch.setattr(publish, "Segmenter", SimpleNamespace(from_parts=lambda *a, **k: built.append(a)))
    cfg = load_config(None, ["tracking.log_model=false"])
    assert log_segmenter_model(tracker, cfg, torch.nn.Identity(), torch.zeros(2, 3), tmp_path) is False
    assert built == [] and logged == [] and list(tmp_path.iterdir()) == []
    assert log_segmenter_model(tracker, load_config(None, []), torch.nn.Identity(), torch.zeros(2, 3), tmp_path) is False
    assert len(built) == 1 and logged == []


def test_pyfunc_model_gives_the_segmenters_maps(exported, tmp_path):
    import mlflow

    from primaps_dist import Segmenter
    from primaps_dist.segmenter.mlflow_model import save_mlflow_model

    folder = save_mlflow_model(exported, tmp_path / "mlflow_model", CROP)
    mlmodel = (folder / "MLmodel").read_text()
    assert "signature:" in mlmodel and "uint8" in mlmodel and "int64" in mlmodel
    assert (folder / "input_example.json").is_file()
    requirements = (folder / "requirements.txt").read_text().split()  # pinned: MLflow inferred nothing
    for package in ("mlflow", "numpy", "torch"):
        assert f"{package}=={importlib.metadata.version(package).split('+')[0]}" in requirements, requirements
    batch = images_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = mlflow.pyfunc.load_model(str(folder)).predict(batch)
    assert not [w for w in caught if "type hint" in str(w.message).lower()], [str(w.message) for w in caught]
    assert maps.shape == (2, 70, 90) and maps.dtype == np.int64 and maps.max() < NUM_CLASSES
    expected = Segmenter.from_export(exported).segment(list(batch))
    assert all(np.array_equal(got, ids.numpy()) for got, ids in zip(maps, expected))
    from_mlflow = Segmenter.from_mlflow(str(folder)).segment(list(batch))
    assert all(torch.equal(got, ids) for got, ids in zip(from_mlflow, expected))


def readme_mlflow_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use a trained model", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "mlflow models serve" in b]
    return block


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_training_logs_and_registers_the_model_and_mlflow_serves_it(demo_data, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from primaps_dist import Segmenter

    env = child_env(tmp_path)
    out = tmp_path / "run"
    run_checked(module_command("primaps_dist.train", *tiny_train_args(
        demo_data.train_shards, out, "tracking.register_model=primaps-demo", val_shards=demo_data.val_shards,
        tracking=True, log_model=True)), env=env, cwd=tmp_path, timeout=400)
    uri = env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {f.path for f in client.list_artifacts(run.info.run_id, "segmenter")} >= {"segmenter/MLmodel",
                                                                                   "segmenter/artifacts"}
    (version,) = client.search_model_versions("name='primaps-demo'")
    assert version.run_id == run.info.run_id and str(version.version) == "1"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())

    # The README's MLflow block, as written, with this run's id and a free port.
    port = free_port()
    model_uri = f"runs:/{run.info.run_id}/segmenter"
    serve_line, curl_line, python_line = [
        line.split("  #")[0].replace("<run id>", run.info.run_id).replace("5001", str(port))
        for line in readme_mlflow_block().splitlines() if line.strip()]
    serve = shlex.split(serve_line)
    assert serve[:3] == ["mlflow", "models", "serve"] and model_uri in serve
    batch = images_batch(count=3)
    (tmp_path / "request.json").write_text(json.dumps({"inputs": batch.tolist()}))
    with Background([str(VENV_BIN / "mlflow"), *serve[1:]], env, tmp_path / "serve.log", cwd=tmp_path) as server:
        wait_until(lambda: _ping(f"http://127.0.0.1:{port}/ping"), 240, "mlflow models serve to answer", alive=server)
        _post(f"http://127.0.0.1:{port}/invocations", {"inputs": batch[:1].tolist()})  # warm-up
        begin = time.perf_counter()
        served = np.asarray(_post(f"http://127.0.0.1:{port}/invocations", {"inputs": batch.tolist()})["predictions"])
        latency = (time.perf_counter() - begin) / len(batch)
        curl = run_checked(shlex.split(curl_line), env=env, cwd=tmp_path, timeout=120)
        assert np.array_equal(np.asarray(json.loads(curl.stdout)["predictions"]), served)
    printed = run_checked([PYTHON, *shlex.split(python_line)[1:]], env=env, cwd=tmp_path, timeout=300)
    assert printed.stdout.strip() == "(1, 64, 64)", printed.describe()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        loaded = mlflow.pyfunc.load_model(model_uri).predict(batch)
        registered = Segmenter.from_mlflow("models:/primaps-demo/1").segment(list(batch))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert served.shape == (3, 70, 90) and np.array_equal(served, loaded)
    assert all(np.array_equal(got, ids.numpy()) for got, ids in zip(loaded, registered))
    assert set(np.unique(served)) <= set(metrics["assignment"]) | {255}  # class ids of the final evaluation
    print(f"\nmlflow models serve: {latency * 1e3:.0f} ms per {batch.shape[1]}x{batch.shape[2]} image over HTTP "
          f"(batch of {len(batch)}, CPU, 1 thread)")


@pytest.mark.slow
def test_dead_tracking_server_neither_stalls_nor_fails_training(demo_data, tmp_path):
    from primaps_dist.tracking import SPOOL_NAME

    out = tmp_path / "run"
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_checked(module_command("primaps_dist.train", *tiny_train_args(
        demo_data.train_shards, out, f"tracking.tracking_uri={dead}", "tracking.register_model=primaps-demo",
        tracking=True, log_model=True)), env=child_env(tmp_path), cwd=tmp_path, timeout=400)
    records = [json.loads(line) for line in (out / SPOOL_NAME).read_text().splitlines() if line.strip()]
    kinds = [(r["kind"], r["name"] if r["kind"] == "register_model" else r.get("artifact_path")) for r in records]
    assert ("artifact", "segmenter") in kinds and ("register_model", "primaps-demo") in kinds
    assert kinds.index(("artifact", "segmenter")) < kinds.index(("register_model", "primaps-demo"))
    assert (out / "mlflow_model" / "MLmodel").is_file()
    assert "segmenter model not logged" not in result.output


def test_a_registration_resent_after_an_outage_creates_one_version(tmp_path):
    """The server created the version but its answer was lost (an outage): the journal resends the record, which
    must find that version instead of creating a second one. Another registration record of the run (a resumed run
    that ends again) is a new version; a record from an older journal (no record id) is matched by run and source."""
    from mlflow import MlflowClient

    from primaps_dist.tracking.delivery import REGISTER_RECORD_TAG, Delivery, Unreachable

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    delivery = Delivery(uri, tmp_path / "mlflow_runs.json", tmp_path)
    delivery.deliver([{"kind": "run", "run": "local-a", "experiment": "register", "time": 0},
                      {"kind": "run", "run": "local-b", "experiment": "register", "time": 0}])
    run_a, run_b = delivery.resolve("local-a"), delivery.resolve("local-b")
    record = {"kind": "register_model", "run": "local-a", "name": "resent", "artifact_path": "segmenter",
              "record_id": "r1"}
    real_create = delivery.client.create_model_version

    def create_then_lose_the_answer(*args, **kwargs):
        real_create(*args, **kwargs)
        raise ConnectionError("connection reset by peer")

    delivery.client.create_model_version = create_then_lose_the_answer
    with pytest.raises(Unreachable):
        delivery.deliver([record])
    delivery.client.create_model_version = real_create
    assert delivery.deliver([record]) == 1  # the resend
    assert delivery.deliver([dict(record)]) == 1  # and once more (a replay of the same journal)
    client = MlflowClient(uri)
    versions = client.search_model_versions("name='resent'")
    assert [(str(v.version), v.run_id, v.tags.get(REGISTER_RECORD_TAG)) for v in versions] == [("1", run_a, "r1")]

    delivery.deliver([{**record, "record_id": "r2"}])  # a second registration record of the run
    legacy = {"kind": "register_model", "run": "local-b", "name": "resent", "artifact_path": "segmenter"}
    delivery.deliver([legacy, legacy])
    versions = sorted(client.search_model_versions("name='resent'"), key=lambda v: int(v.version))
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run_a), ("2", run_a), ("3", run_b)]
