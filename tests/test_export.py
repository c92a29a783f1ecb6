"""primaps-dist export: the folder's contents, its program run in a process where primaps_dist cannot be imported and
every socket connect fails (equal to the in-process Segmenter within 1e-5), Segmenter.from_export, and bad input."""

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch

from support.demo import CROP, DEMO_CHANNELS, NUM_CLASSES
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


@pytest.fixture(scope="module")
def head_checkpoint(demo_checkpoint, tmp_path_factory):
    """The demo checkpoint relabelled as trained with ``backbone.head_weights``: a random 152 -> 152 head with the
    conv-ReLU-conv branch (made by the head's command line), so the 152-channel prototypes fit its output."""
    from primaps_dist.backbones.projection_head import main as head_main

    folder = tmp_path_factory.mktemp("head_run")
    head = folder / "random_head.pt"
    assert head_main(["random", str(head), "--in-channels", str(DEMO_CHANNELS), "--out-channels",
                      str(DEMO_CHANNELS), "--seed", "3"]) == 0
    step = sorted(p for p in demo_checkpoint.iterdir() if p.name.startswith("step_"))[-1]
    target = folder / step.name
    shutil.copytree(step, target)
    payload = torch.load(target / "checkpoint.pt", weights_only=True)
    payload["config"]["backbone"]["head_weights"] = str(head)
    torch.save(payload, target / "checkpoint.pt")
    return target, head


@pytest.fixture(scope="module")
def exported_with_head(head_checkpoint, tmp_path_factory):
    checkpoint, _ = head_checkpoint
    out = tmp_path_factory.mktemp("export_head") / "model"
    result = run_main_in_process("primaps_dist.cli", ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert result.returncode == 0, result.describe()
    return out


def test_from_export_of_a_model_with_projection_head(exported_with_head, head_checkpoint, demo_checkpoint, tmp_path):
    """The head's tensors travel in weights.safetensors (backbone.body.1.*): from_export rebuilds the head from
    them, without the head file, and gives the in-process Segmenter's maps; dropping the head changes them."""
    from safetensors.torch import load_file

    from primaps_dist import Segmenter
    from primaps_dist.segmenter import standalone

    checkpoint, head = head_checkpoint
    tensors = load_file(str(exported_with_head / "weights.safetensors"))
    head_keys = sorted(k for k in tensors if k.startswith("backbone.body.1."))
    assert head_keys == [f"backbone.body.1.{name}" for name in (
        "linear.bias", "linear.weight", "nonlinear.0.bias", "nonlinear.0.weight", "nonlinear.2.bias",
        "nonlinear.2.weight")]
    assert tensors["backbone.body.1.nonlinear.0.weight"].shape == (DEMO_CHANNELS, DEMO_CHANNELS, 1, 1)
    assert all(k.startswith(("backbone.body.0.", "backbone.body.1.")) for k in tensors if k.startswith("backbone."))
    images = sample_images()
    reference = Segmenter.from_checkpoint(checkpoint, device="cpu")
    expected_maps, expected_scores = reference.segment(images), reference.scores(images)
    without_head = Segmenter.from_checkpoint(demo_checkpoint / "latest", device="cpu").segment(images)
    assert any(not torch.equal(a, b) for a, b in zip(expected_maps, without_head))  # the head matters
    head.rename(tmp_path / head.name)  # the export needs no head file
    try:
        loaded = Segmenter.from_export(exported_with_head)
        assert loaded.scorer.backbone.out_channels == DEMO_CHANNELS
        for got, expected in zip(loaded.segment(images), expected_maps):
            assert torch.equal(got, expected)
        for got, expected in zip(loaded.scores(images), expected_scores):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        for got, expected in zip(standalone.load(exported_with_head).scores(images), expected_scores):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    finally:
        (tmp_path / head.name).rename(head)


@pytest.mark.parametrize("damage", ["no_branch_weight", "branch_shape", "no_head_tensors", "head_undeclared"])
def test_damaged_head_export_is_refused(exported_with_head, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from primaps_dist import Segmenter
    from primaps_dist.errors import UserError

    folder = _copy(exported_with_head, tmp_path)
    tensors = load_file(str(folder / "weights.safetensors"))
    if damage == "no_branch_weight":
        del tensors["backbone.body.1.nonlinear.2.weight"]
        needle = "first mismatch: body.1.nonlinear.2.weight"
    elif damage == "branch_shape":  # a 100-channel hidden layer: the sizes disagree with the second conv's
        tensors["backbone.body.1.nonlinear.0.weight"] = torch.zeros(100, DEMO_CHANNELS, 1, 1)
        needle = "first mismatch: body.1.nonlinear.0.bias"
    elif damage == "no_head_tensors":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("backbone.body.1.")}
        needle = "first mismatch: body.1.*: no 4-d 'linear.weight'"
    else:  # the head's tensors, but config.json declares no head
        config = json.loads((folder / "config.json").read_text())
        config["backbone"]["head_weights"] = ""
        (folder / "config.json").write_text(json.dumps(config))
        needle = "do not fit backbone efficientnet_lite0 layers"
    save_file(tensors, str(folder / "weights.safetensors"))
    with pytest.raises(UserError) as caught:
        Segmenter.from_export(folder)
    message = str(caught.value)
    assert needle in message and "weights.safetensors" in message and "\n" not in message, message


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
