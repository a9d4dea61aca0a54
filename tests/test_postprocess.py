"""The post-processing gate on hand-made probability maps."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.inference.postprocess import (
    Gate,
    apply_gate,
    area_scale_for,
    load_gate,
    remove_small_components,
    save_gate,
)


def make_prob() -> np.ndarray:
    """8x8 map: a 2x2 core at 0.9 inside a 4x4 region at 0.6, and a lone 0.7 pixel."""
    prob = np.full((8, 8), 0.1, dtype=np.float32)
    prob[1:5, 1:5] = 0.6
    prob[2:4, 2:4] = 0.9
    prob[7, 7] = 0.7
    return prob


def test_default_gate_is_a_single_threshold_at_half():
    prob = make_prob()
    mask = apply_gate(prob)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (prob > 0.5).astype(np.uint8))
    assert mask.sum() == 16 + 1


def test_threshold_is_strict():
    prob = np.array([[0.5, 0.50001]], dtype=np.float32)
    np.testing.assert_array_equal(apply_gate(prob), [[0, 1]])


def test_top_threshold_and_min_area_empty_the_image():
    prob = make_prob()
    # 4 pixels exceed 0.8: a min area of 5 empties the image, 4 lets it through.
    assert apply_gate(prob, Gate(top_threshold=0.8, min_area_px=5)).sum() == 0
    passed = apply_gate(prob, Gate(top_threshold=0.8, min_area_px=4))
    np.testing.assert_array_equal(passed, (prob > 0.5).astype(np.uint8))


def test_bottom_threshold_draws_the_mask_once_the_gate_passes():
    prob = make_prob()
    mask = apply_gate(prob, Gate(top_threshold=0.8, min_area_px=1, bottom_threshold=0.65))
    expected = np.zeros((8, 8), np.uint8)
    expected[2:4, 2:4] = 1
    expected[7, 7] = 1
    np.testing.assert_array_equal(mask, expected)


def test_top_threshold_with_no_pixel_above_it_and_min_area_zero_still_passes():
    # min_area 0 means "no gate": the literal rule (>= 0 pixels above top) always holds.
    prob = make_prob()
    mask = apply_gate(prob, Gate(top_threshold=0.95, min_area_px=0, bottom_threshold=0.5))
    assert mask.sum() == 17


def test_small_components_are_removed():
    prob = make_prob()
    mask = apply_gate(prob, Gate(min_component_area_px=2))
    expected = np.zeros((8, 8), np.uint8)
    expected[1:5, 1:5] = 1
    np.testing.assert_array_equal(mask, expected)
    assert apply_gate(prob, Gate(min_component_area_px=16)).sum() == 16
    assert apply_gate(prob, Gate(min_component_area_px=17)).sum() == 0


def test_components_are_eight_connected():
    mask = np.zeros((5, 5), np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # a diagonal line: one component of 3
    mask[4, 0] = 1  # alone
    kept = remove_small_components(mask, 3)
    expected = mask.copy()
    expected[4, 0] = 0
    np.testing.assert_array_equal(kept, expected)


def test_areas_are_scaled_from_original_pixels():
    prob = make_prob()
    # 4 working pixels exceed 0.8. At 1/16 scale (1024 -> 256) 64 original px = 4 working px.
    scale = area_scale_for((1024, 1024), (256, 256))
    assert scale == 1 / 16
    assert apply_gate(prob, Gate(top_threshold=0.8, min_area_px=64), scale).sum() == 17
    assert apply_gate(prob, Gate(top_threshold=0.8, min_area_px=65), scale).sum() == 0
    # Component of 16 working px = 256 original px at that scale; the lone pixel = 16.
    assert apply_gate(prob, Gate(min_component_area_px=256), scale).sum() == 16
    assert apply_gate(prob, Gate(min_component_area_px=257), scale).sum() == 0
    assert apply_gate(prob, Gate(min_component_area_px=16), scale).sum() == 17


def test_area_scale_for_non_square_crop():
    assert area_scale_for((800, 1000), (256, 256)) == pytest.approx(256 * 256 / 800_000)
    with pytest.raises(ConfigError):
        area_scale_for((0, 1000), (256, 256))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_threshold", 1.5),
        ("top_threshold", -0.01),
        ("bottom_threshold", 2),
        ("bottom_threshold", math.nan),
        ("min_area_px", -1),
        ("min_component_area_px", -0.5),
        ("min_component_area_px", math.inf),
        ("top_threshold", "0.5"),
        ("min_area_px", True),
    ],
)
def test_bad_gate_values_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        Gate(**{field: value})


def test_bad_apply_arguments():
    with pytest.raises(InputError, match="2-D"):
        apply_gate(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ConfigError, match="area_scale"):
        apply_gate(make_prob(), Gate(), area_scale=0)


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "postprocess.json"
    gate = Gate(
        top_threshold=0.75, min_area_px=2000, bottom_threshold=0.4, min_component_area_px=250
    )
    save_gate(path, gate)
    assert json.loads(path.read_text()) == {
        "top_threshold": 0.75,
        "min_area_px": 2000,
        "bottom_threshold": 0.4,
        "min_component_area_px": 250,
    }
    assert load_gate(path) == gate


def test_partial_file_takes_defaults(tmp_path):
    path = tmp_path / "postprocess.json"
    path.write_text('{"top_threshold": 0.7}')
    assert load_gate(path) == Gate(top_threshold=0.7)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"top_threshold": 0.7, "colour": 1}', "unknown setting"),
        ('{"bottom_threshold": 3}', "bottom_threshold must be in"),
        ("[1, 2]", "JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "postprocess.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_gate(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_gate(tmp_path / "absent.json")


def _labelled_reference(mask: np.ndarray, min_area: float) -> np.ndarray:
    """The rule written plainly: label the whole mask, keep components of >= min_area px."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return keep[labels].astype(np.uint8)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.tuples(st.integers(1, 90), st.integers(1, 90)),
    density=st.floats(0.0, 0.7),
    blobs=st.integers(0, 3),
    min_area=st.floats(0.0, 40.0),
)
def test_removing_small_components_matches_labelling_the_whole_mask(
    seed, size, density, blobs, min_area
):
    """The fast path (labels only in the occupied box; few small components erased one by one,
    many by a lookup) gives exactly the plain rule's mask, and leaves its input alone."""
    rng = np.random.default_rng(seed)
    mask = (rng.random(size) < density).astype(np.uint8)
    for _ in range(blobs):  # a few large components among the noise
        top, left = rng.integers(0, size[0]), rng.integers(0, size[1])
        mask[top : top + rng.integers(1, 30), left : left + rng.integers(1, 30)] = 1
    given_mask = mask.copy()
    result = remove_small_components(mask, min_area)
    np.testing.assert_array_equal(result, _labelled_reference(mask, min_area))
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(mask, given_mask)
    gate = Gate(bottom_threshold=0.5, min_component_area_px=min_area)
    np.testing.assert_array_equal(apply_gate(mask * 0.9, gate), _labelled_reference(mask, min_area))


def test_both_ways_of_erasing_small_components_are_exercised():
    """A noisy map with hundreds of small components (the lookup) and one with a handful (each
    erased in its box), each equal to the plain rule, on a map whose border rows stay empty."""
    rng = np.random.default_rng(1)
    noisy = np.zeros((300, 400), np.uint8)
    noisy[20:280, 30:370] = rng.random((260, 340)) < 0.2
    few = np.zeros((300, 400), np.uint8)
    few[100:160, 100:200] = 1
    few[[10, 40, 290], [20, 390, 5]] = 1  # three single pixels far apart
    for mask in (noisy, few):
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        small = int(np.sum(stats[1:, 4] < 5))
        assert (small > 64) == (mask is noisy) and small > 0
        np.testing.assert_array_equal(
            remove_small_components(mask, 5), _labelled_reference(mask, 5)
        )
    assert remove_small_components(few, 5).sum() == 60 * 100
