"""primaps-dist export: the folder's contents, its program run in a process where primaps_dist cannot be imported and
every socket connect fails (equal to the in-process Segmenter within 1e-5), Segmenter.from_export, and bad input."""

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch

from support.demo import CROP, NUM_CLASSES
from support.env import PYTHON, child_env
from support.run import assert_one_line_error, run_command, run_main_in_process

pytestmark = pytest.mark.usefixtures("single_thread")

EXPORT_FILES = {"config.json", "weights.safetensors", "window_program.pt2", "segment.py"}

# Run in a fresh interpreter from an unrelated folder: importing primaps_dist fails, and so does every attempt to
# open a network connection. The export must still load and run.
BLOCKED_RUNNER = textwrap.dedent("""
    import importlib.abc, importlib.util, socket, sys

    class NoPrimaps(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "primaps_dist" or name.startswith("primaps_dist."):
                raise ImportError("primaps_dist is blocked in this test")

    def no_network(*args, **kwargs):
        raise OSError("network blocked in this test")

    sys.meta_path.insert(0, NoPrimaps())
    socket.socket.connect = no_network
    socket.create_connection = no_network
    import numpy as np, torch

    folder, inputs, output = sys.argv[1], sys.argv[2], sys.argv[3]
    spec = importlib.util.spec_from_file_location("segment", folder + "/segment.py")
    segment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(segment)
    try:
        import primaps_dist  # noqa: F401
        raise SystemExit("primaps_dist was importable")
    except ImportError:
        pass
    try:
        socket.create_connection(("127.0.0.1", 9))
        raise SystemExit("the network was not blocked")
    except OSError:
        pass
    model = segment.load(folder)
    stored = np.load(inputs)
    images = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    scores = model.scores(images)
    np.savez(output, *[s.numpy() for s in scores])
    print("modules:", sorted(m for m in sys.modules if m.startswith("primaps")))
""")


def sample_images():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((CROP, CROP), (40, 90), (100, 130))]


@pytest.fixture(scope="module")
def exported(demo_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    result = run_main_in_process("primaps_dist.cli", ["export", "--checkpoint", str(demo_checkpoint / "latest"),
                                                      "--out", str(out)])
    assert result.returncode == 0, result.describe()
    print(result.stdout)
    return out


def test_export_folder_holds_safetensors_config_and_program(exported):
    from safetensors.torch import load_file

    assert {p.name for p in exported.iterdir()} == EXPORT_FILES
    config = json.loads((exported / "config.json").read_text())
    assert config["crop_size"] == CROP and config["num_classes"] == NUM_CLASSES and config["crf"] is None
    tensors = load_file(str(exported / "weights.safetensors"))
    assert tensors["prototypes"].shape == (NUM_CLASSES, config["channels"])
    assert torch.allclose(tensors["preprocessing.mean"], torch.full((3,), 127 / 255))
    assert sum(k.startswith("backbone.") for k in tensors) > 100


def test_exported_program_runs_without_primaps_dist_and_network(exported, demo_checkpoint, tmp_path):
    from primaps_dist import Segmenter

    images = sample_images()
    inputs, output = tmp_path / "images.npz", tmp_path / "scores.npz"
    np.savez(inputs, *images)
    script = tmp_path / "runner.py"
    script.write_text(BLOCKED_RUNNER)
    env = child_env(tmp_path, PYTHONPATH=None)
    result = run_command([PYTHON, str(script), str(exported), str(inputs), str(output)], env=env, cwd=tmp_path,
                         timeout=180)
    assert result.returncode == 0, result.describe()
    assert "modules: []" in result.stdout, result.describe()
    stored = np.load(output)
    program_scores = [stored[f"arr_{i}"] for i in range(len(images))]
    in_process = Segmenter.from_checkpoint(demo_checkpoint / "latest", device="cpu").scores(images)
    for image, got, expected in zip(images, program_scores, in_process):
        assert got.shape == (NUM_CLASSES, *image.shape[:2])
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)


def test_from_export_equals_from_checkpoint(exported, demo_checkpoint):
    from primaps_dist import Segmenter

    images = sample_images()
    reference = Segmenter.from_checkpoint(demo_checkpoint / "latest", device="cpu")
    loaded = Segmenter.from_export(exported)
    for got, expected in zip(loaded.segment(images), reference.segment(images)):
        assert torch.equal(got, expected)


def test_export_with_assignment_outputs_class_ids(demo_checkpoint, tmp_path):
    from primaps_dist import Segmenter

    metrics = tmp_path / "metrics.json"
    assignment = [5, 4, 3, 2, 1, 0]
    metrics.write_text(json.dumps({"assignment": assignment, "class_names": list("abcdef")}))
    out = tmp_path / "model"
    result = run_main_in_process("primaps_dist.cli", ["export", "--checkpoint", str(demo_checkpoint), "--out", str(out),
                                                      "--assignment", str(metrics)])
    assert result.returncode == 0, result.describe()
    images = sample_images()[:2]
    clusters = Segmenter.from_checkpoint(demo_checkpoint, device="cpu").segment(images)
    loaded = Segmenter.from_export(out)
    assert loaded.class_names == list("abcdef")
    for got, ids in zip(loaded.segment(images), clusters):
        assert torch.equal(got, torch.tensor(assignment)[ids])


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_incomplete_checkpoint_is_refused(demo_checkpoint, tmp_path):
    step = sorted(p for p in demo_checkpoint.iterdir() if p.name.startswith("step_"))[-1]
    broken = tmp_path / step.name
    shutil.copytree(step, broken)
    (broken / "COMPLETE").unlink()
    result = run_main_in_process("primaps_dist.cli", ["export", "--checkpoint", str(broken), "--out", str(tmp_path / "m")])
    assert_one_line_error(result, "incomplete")
    assert not (tmp_path / "m").exists()
    payload = torch.load(step / "checkpoint.pt", weights_only=True)
    del payload["em_state"]
    (broken / "COMPLETE").write_text("")
    torch.save(payload, broken / "checkpoint.pt")
    result = run_main_in_process("primaps_dist.cli", ["export", "--checkpoint", str(broken), "--out", str(tmp_path / "m")])
    assert_one_line_error(result, "em_state")


@pytest.mark.parametrize("damage", ["truncated_weights", "no_config", "garbage_config", "other_layers",
                                    "other_backbone"])
def test_damaged_export_folder_is_refused(exported, tmp_path, damage, demo_data):
    folder = _copy(exported, tmp_path)
    if damage == "truncated_weights":
        data = (folder / "weights.safetensors").read_bytes()
        (folder / "weights.safetensors").write_bytes(data[: len(data) // 2])
        needle = "weights.safetensors"
    elif damage == "no_config":
        (folder / "config.json").unlink()
        needle = "missing config.json"
    elif damage == "garbage_config":
        (folder / "config.json").write_text("{not json")
        needle = "config.json"
    elif damage == "other_layers":  # the weights of this backbone, declared as another layer selection of it
        config = json.loads((folder / "config.json").read_text())
        config["backbone"]["layers"] = [3]
        (folder / "config.json").write_text(json.dumps(config))
        needle = "do not fit backbone efficientnet_lite0 layers [3]"
    else:  # the weights of this backbone, declared as another backbone
        config = json.loads((folder / "config.json").read_text())
        config["backbone"]["name"] = "timm:resnet18"
        (folder / "config.json").write_text(json.dumps(config))
        needle = "do not fit backbone timm:resnet18"
    result = run_main_in_process("primaps_dist.predict", ["--export", str(folder), "--images",
                                                          str(demo_data.val_images), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, needle)


def test_export_refuses_a_non_empty_output_folder(demo_checkpoint, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run_main_in_process("primaps_dist.cli", ["export", "--checkpoint", str(demo_checkpoint), "--out", str(out)])
    assert_one_line_error(result, "--out", "not an empty folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_from_mlflow_names_a_uri_without_a_model(tmp_path):
    from primaps_dist import Segmenter
    from primaps_dist.errors import UserError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no primaps-dist export folder"):
        Segmenter.from_mlflow(str(tmp_path / "empty"))


def test_export_keeps_flip_in_the_program_and_the_crf_in_the_config(demo_checkpoint, tmp_path):
    from primaps_dist import Segmenter
    from primaps_dist.segmenter import standalone

    out = tmp_path / "model"
    result = run_main_in_process("primaps_dist.cli", ["export", "--checkpoint", str(demo_checkpoint), "--out", str(out),
                                                      "eval.flip=true", "eval.crf=true", "crf.iterations=3"])
    assert result.returncode == 0, result.describe()
    config = json.loads((out / "config.json").read_text())
    assert config["flip"] is True and config["crf"]["iterations"] == 3
    images = sample_images()[:2]
    reference = Segmenter.from_checkpoint(demo_checkpoint, device="cpu", overrides=["crf.iterations=3"], flip=True,
                                          crf=True)
    for got, expected in zip(standalone.load(out).scores(images), reference.scores(images)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    loaded = Segmenter.from_export(out)
    assert loaded.crf_fn is not None and loaded.crf_fn.keywords["iterations"] == 3
    for got, expected in zip(loaded.segment(images), reference.segment(images)):
        assert torch.equal(got, expected)
    no_flip = Segmenter.from_checkpoint(demo_checkpoint, device="cpu").scores(images[:1])[0]
    assert not torch.allclose(no_flip, reference.scores(images[:1])[0], atol=1e-3)  # the flip changes the scores
