"""Config loading: YAML + overrides, types, validation errors that name the key."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from primaps_dist.config import Config, CRFConfig, config_from_dict, flatten, load_config, save_config
from primaps_dist.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.crop_size % cfg.backbone.preset_stride() == 0


def test_overrides_win_over_file_and_parse_yaml_types() -> None:
    cfg = load_config(REPO / "configs/demo.yaml", ["train.em_steps=7", "em.mode=gradient", "data.train_scale=[1, 2]",
                                                    "data.hflip=false", "em.lr=1e-3"])
    assert cfg.train.em_steps == 7 and cfg.em.mode == "gradient"
    assert cfg.data.train_scale == [1.0, 2.0] and cfg.data.hflip is False and cfg.em.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.nope=1", "data.nope"),
        ("nope.x=1", "nope"),
        ("data.num_classes=1", "data.num_classes"),
        ("data.num_classes=abc", "data.num_classes"),
        ("data.crop_size=100", "data.crop_size"),  # demo backbone stride is 8
        ("data.batch_size=0", "data.batch_size"),
        ("data.train_scale=[2, 1]", "data.train_scale"),
        ("data.hflip=maybe", "data.hflip"),
        ("backbone.name=resnet9000", "backbone.name"),
        ("backbone.weights=/does/not/exist.pth", "backbone.weights"),
        ("proposals.threshold=1.5", "proposals.threshold"),
        ("proposals.max_masks=0", "proposals.max_masks"),
        ("crf.backend=gpu", "crf.backend"),
        ("crf.downsample=0", "crf.downsample"),
        ("crf.downsample=2.5", "crf.downsample"),
        ("eval.crf_downsample=0", "eval.crf_downsample"),
        ("em.mode=magic", "em.mode"),
        ("em.momentum=1.0", "em.momentum"),
        ("train.pca_steps=0", "train.pca_steps"),
        ("dist.timeout_s=-1", "dist.timeout_s"),
        ("data=3", "data"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/demo.yaml", [override])
    message = str(info.value)
    assert f"'{key}'" in message and "\n" not in message


def test_crf_downsample_is_a_torch_setting_and_eval_has_its_own() -> None:
    from primaps_dist.crf import make_crf
    from primaps_dist.evaluate import eval_crf

    cfg = load_config(REPO / "configs/demo.yaml", ["crf.backend=pydensecrf"])  # default factor: no error
    assert cfg.crf.downsample == 2
    if importlib.util.find_spec("pydensecrf") is not None:
        assert make_crf(**dataclasses.asdict(cfg.crf)).keywords["downsample"] == 1  # factor unused there
    cfg = load_config(REPO / "configs/demo.yaml", ["crf.downsample=4", "eval.crf=true"])
    assert eval_crf(cfg).keywords["downsample"] == 1  # evaluation: full resolution unless asked
    cfg = load_config(REPO / "configs/demo.yaml", ["eval.crf=true", "eval.crf_downsample=3", "crf.backend=none"])
    assert eval_crf(cfg).keywords == {**eval_crf(cfg).keywords, "downsample": 3, "backend": "torch"}
    assert eval_crf(load_config(REPO / "configs/demo.yaml")) is None
    with pytest.raises(ConfigError, match="'crf.downsample': must be an integer >= 1, got True"):
        CRFConfig(downsample=True).validate()


def test_vit_crop_must_be_multiple_of_patch() -> None:
    with pytest.raises(ConfigError, match="data.crop_size.*multiple of the backbone stride 14"):
        load_config(REPO / "configs/cityscapes_dinov2_vitb14.yaml", ["data.crop_size=320"])
    assert load_config(REPO / "configs/cityscapes_dinov2_vitb14.yaml").data.crop_size == 322


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(listing)
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["justakey"])


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("data: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(UserError):
        load_config(evil)
    assert not (tmp_path / "pwned").exists()


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/demo.yaml", ["train.seed=5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    flat = flatten(cfg.to_dict())
    assert flat["train.seed"] == 5 and "data.crop_size" in flat


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=-5, max_value=400))
def test_num_classes_validation_property(k: int) -> None:
    if 2 <= k < 255:
        assert load_config(None, [f"data.num_classes={k}"]).data.num_classes == k
    else:
        with pytest.raises(ConfigError, match="data.num_classes"):
            load_config(None, [f"data.num_classes={k}"])


# One invalid value per section: Config.validate must reach every section, not only accept the defaults.
BROKEN_VALUE = {
    "data": ("num_classes", 1),
    "backbone": ("name", "resnet9000"),
    "proposals": ("threshold", 1.5),
    "crf": ("iterations", 0),
    "em": ("mode", "magic"),
    "train": ("pca_steps", 0),
    "checkpoint": ("keep", 0),
    "tracking": ("num_overlays", -1),
    "dist": ("timeout_s", -1.0),
    "eval": ("resize_short", -1),
}


def test_defaults_validate_and_every_section_is_checked() -> None:
    cfg = Config()
    assert cfg.validate() is cfg and cfg == Config()  # returns the config itself, unchanged
    yaml.safe_dump(cfg.to_dict())
    assert set(BROKEN_VALUE) == {section.name for section in dataclasses.fields(Config)}
    for section, (key, value) in BROKEN_VALUE.items():
        broken = Config()
        setattr(getattr(broken, section), key, value)
        with pytest.raises(ConfigError, match=f"'{section}.{key}'"):
            broken.validate()
