"""Label presets: the Cityscapes, COCO-Stuff-27 and Potsdam-3 mappings on small synthetic label maps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from primaps_dist.data.label_presets import (
    INVALID,
    POTSDAM_FINE_COLOURS,
    PRESETS,
    generic_preset,
    get_preset,
    map_with_lut,
)

# Spot checks copied by hand from STEGO src/data.py, Coco.fine_to_coarse.
STEGO_COCO_SAMPLES = {
    0: 9, 1: 11, 8: 11, 9: 8, 14: 8, 15: 7, 24: 7, 25: 6, 32: 6, 33: 10, 42: 10, 43: 5, 50: 5, 51: 2, 60: 2,
    61: 3, 70: 3, 71: 0, 76: 0, 77: 1, 82: 1, 83: 4, 90: 4, 91: 17, 93: 22, 98: 25, 100: 13, 101: 12,
    105: 23, 110: 21, 119: 26, 120: 14, 126: 24, 131: 16, 147: 26, 152: 14, 156: 23, 169: 14, 170: 18,
    176: 18, 177: 26, 178: 26, 179: 19, 180: 19, 181: 24,
}  # fmt: skip


def test_cityscapes_mapping_is_exact():
    preset = get_preset("cityscapes")
    assert preset.num_classes == 27 and preset.class_names[0] == "road" and preset.class_names[-1] == "bicycle"
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mapped, invalid = preset.map_ids(raw)
    expected = np.full(256, 255, dtype=np.uint8)
    expected[7:34] = np.arange(27)
    assert np.array_equal(mapped.ravel(), expected)
    assert invalid == list(range(34, 255))  # ids above 33 do not exist in labelIds maps
    ok, invalid = preset.map_ids(np.array([[0, 6, 7], [8, 33, 255]], dtype=np.uint8))
    assert ok.tolist() == [[255, 255, 0], [1, 26, 255]] and invalid == []


def test_cityscapes_file_patterns():
    preset = get_preset("cityscapes")
    assert preset.image_id("aachen_000000_000019_leftImg8bit") == "aachen_000000_000019"
    assert preset.label_id("aachen_000000_000019_gtFine_labelIds") == "aachen_000000_000019"
    assert preset.accepts_label("aachen_000000_000019_gtFine_labelIds")
    assert not preset.accepts_label("aachen_000000_000019_gtFine_color")
    assert not preset.accepts_label("aachen_000000_000019_gtFine_instanceIds")


def test_cocostuff_27_matches_stego_table():
    preset = get_preset("cocostuff")
    assert preset.num_classes == 27
    lut = preset.lut
    for fine, coarse in STEGO_COCO_SAMPLES.items():
        assert lut[fine] == coarse, fine
    assert (lut[:91] < 12).all(), "thing ids map to the 12 thing super-categories"
    assert (lut[91:182] >= 12).all() and (lut[91:182] < 27).all(), "stuff ids map to the 15 stuff classes"
    assert set(lut[:182].tolist()) == set(range(27)), "every coarse class is reachable"
    assert lut[255] == 255 and (lut[182:255] == INVALID).all()
    label = np.array([[0, 1, 91], [181, 255, 119]], dtype=np.uint8)
    mapped, invalid = preset.map_ids(label)
    assert mapped.tolist() == [[9, 11, 17], [24, 255, 26]] and invalid == []
    _, invalid = preset.map_ids(np.array([[0, 200], [182, 3]], dtype=np.uint8))
    assert invalid == [182, 200]


def test_potsdam_3_classes_from_ids_and_colours():
    preset = get_preset("potsdam")
    assert preset.class_names == ("roads and cars", "buildings and clutter", "vegetation and trees")
    mapped, invalid = preset.map_ids(np.array([[0, 1, 2], [3, 4, 5], [255, 255, 255]], dtype=np.uint8))
    assert mapped.tolist() == [[0, 1, 2], [2, 0, 1], [255, 255, 255]] and invalid == []
    _, invalid = preset.map_ids(np.array([[6, 0]], dtype=np.uint8))
    assert invalid == [6]
    colours = np.array([list(POTSDAM_FINE_COLOURS) + [(0, 0, 0)]], dtype=np.uint8)  # [1, 7, 3]
    mapped, invalid = preset.map_ids(colours)
    assert mapped.tolist() == [[0, 1, 2, 2, 0, 1, 255]] and invalid == []
    assert preset.image_id("top_potsdam_2_10_RGB") == preset.label_id("top_potsdam_2_10_label")


def test_generic_preset_checks_the_class_range():
    preset = generic_preset(num_classes=4)
    mapped, invalid = preset.map_ids(np.array([[0, 3, 255, 4, 7]], dtype=np.uint8))
    assert mapped.tolist() == [[0, 3, 255, 255, 255]] and invalid == [4, 7]
    assert generic_preset().map_ids(np.array([[200]], dtype=np.uint8))[1] == []
    assert generic_preset(class_names=("a", "b")).num_classes == 2


def test_wide_integer_labels_outside_the_table_are_invalid():
    mapped, invalid = map_with_lut(np.array([[7, 300], [-1, 33]], dtype=np.int32), PRESETS["cityscapes"].lut)
    assert mapped.tolist() == [[0, 255], [255, 26]] and invalid == [-1, 300]


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="unknown label preset 'voc'"):
        get_preset("voc")


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(PRESETS)), raw=arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6))))
def test_mapping_is_elementwise(name, raw):
    preset = PRESETS[name]
    mapped, invalid = preset.map_ids(raw)
    for value, out in zip(raw.ravel().tolist(), mapped.ravel().tolist()):
        table = int(preset.lut[value])
        assert out == (255 if table == INVALID else table)
    assert invalid == sorted({v for v in raw.ravel().tolist() if preset.lut[v] == INVALID})
