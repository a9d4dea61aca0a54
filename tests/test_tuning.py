"""Gate tuning: the known best gate on constructed maps, and equality with brute force."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.core.metrics import dice_score, iou_score
from pneumo_cli.evaluation.tuning import GateGrid, tune_gate
from pneumo_cli.inference.postprocess import Gate, apply_gate


def positive_case(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """A 20x20 pneumothorax whose rim is only 0.4 sure, plus a 3x3 speck of noise."""
    prob = np.full((64, 64), 0.05, dtype=np.float32)
    truth = np.zeros((64, 64), dtype=np.uint8)
    top = 10 + shift
    truth[top : top + 20, 10:30] = 1
    prob[top : top + 20, 10:30] = 0.4
    prob[top + 5 : top + 15, 15:25] = 0.9  # 100 confident pixels
    prob[50:53, 50:53] = 0.4  # speck: only a component filter removes it
    return prob, truth


def negative_case(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """No pneumothorax: a 25-pixel confident blob and a 225-pixel 0.6 haze."""
    prob = np.full((64, 64), 0.05, dtype=np.float32)
    prob[40 + shift : 45 + shift, 40:45] = 0.9
    prob[5:20, 5 + shift : 20 + shift] = 0.6
    return prob, np.zeros((64, 64), dtype=np.uint8)


def test_tuning_finds_the_known_best_gate():
    cases = [positive_case(s) for s in range(3)] + [negative_case(s) for s in range(3)]
    # Areas in original pixels at a 1/4 area scale: 400 original px = 100 working px.
    grid = GateGrid(
        top_thresholds=(0.5, 0.8),
        min_areas_px=(0, 400),
        bottom_thresholds=(0.3, 0.5),
        min_component_areas_px=(0, 200),
    )
    results = tune_gate([p for p, _ in cases], [t for _, t in cases], grid, area_scale=0.25)
    assert len(results) == 16
    best = results[0]
    assert best.gate == Gate(0.8, 400, 0.3, 200)
    assert best.mean_dice == 1.0
    assert best.mean_iou == 1.0
    assert (best.positive_images_flagged, best.negative_images_flagged) == (3, 0)
    assert results[1].mean_dice < 1.0
    # Without the component filter the speck adds 9 false pixels to each positive.
    by_gate = {r.gate: r for r in results}
    expected = (3 * (2 * 400 / (400 + 409)) + 3) / 6
    assert by_gate[Gate(0.8, 400, 0.3, 0)].mean_dice == pytest.approx(expected)
    # top 0.5 lets the haze through on every negative: those three score 0.
    assert by_gate[Gate(0.5, 400, 0.3, 200)].negative_images_flagged == 3
    assert by_gate[Gate(0.5, 400, 0.3, 200)].mean_dice == pytest.approx(0.5)
    assert [r.mean_dice for r in results] == sorted((r.mean_dice for r in results), reverse=True)


def random_maps(rng: np.random.Generator, count: int, size: int = 48):
    """Blobs of random confidence and size with specks, half of them with a truth blob."""
    yy, xx = np.mgrid[:size, :size]
    probs, truths = [], []
    for i in range(count):
        prob = rng.uniform(0, 0.35, (size, size)).astype(np.float32)
        truth = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(5, size - 5, 2)
            radius = rng.uniform(1.5, 12)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            prob[blob] = rng.uniform(0.35, 1.0)
            if i % 2 == 0:
                truth |= ((yy - cy - 1) ** 2 + (xx - cx) ** 2 < radius**2).astype(np.uint8)
        probs.append(prob)
        truths.append(truth)
    return probs, truths


def test_vectorised_scores_equal_brute_force_apply_gate():
    rng = np.random.default_rng(7)
    probs, truths = random_maps(rng, 10)
    scales = [1 / 16, 1 / 8, 1 / 16, 1 / 4, 1 / 16, 1 / 2, 1 / 16, 1 / 16, 1 / 8, 1 / 16]
    grid = GateGrid()
    results = tune_gate(probs, truths, grid, area_scale=scales)
    assert len(results) == 5 * 5 * 5 * 3 == len({r.gate for r in results})
    for result in results:
        masks = [apply_gate(p, result.gate, s) for p, s in zip(probs, scales, strict=True)]
        dice = np.mean([dice_score(t, m) for t, m in zip(truths, masks, strict=True)])
        iou = np.mean([iou_score(t, m) for t, m in zip(truths, masks, strict=True)])
        assert result.mean_dice == pytest.approx(dice, abs=1e-12), result.gate
        assert result.mean_iou == pytest.approx(iou, abs=1e-12), result.gate
    # The grid really discriminates on these maps.
    assert results[0].mean_dice > results[-1].mean_dice


def test_ties_keep_grid_order():
    prob = np.zeros((8, 8), np.float32)
    truth = np.zeros((8, 8), np.uint8)
    results = tune_gate([prob], [truth], GateGrid())
    assert all(r.mean_dice == 1.0 for r in results)
    assert [r.gate for r in results] == GateGrid().gates()


def test_bad_inputs():
    prob = np.zeros((8, 8), np.float32)
    truth = np.zeros((8, 8), np.uint8)
    with pytest.raises(InputError, match="no images"):
        tune_gate([], [])
    with pytest.raises(InputError, match="only 1 truth"):
        tune_gate([prob, prob], [truth])
    with pytest.raises(InputError, match="more truth masks"):
        tune_gate([prob], [truth, truth])
    with pytest.raises(InputError, match="equal 2-D shapes"):
        tune_gate([prob], [np.zeros((4, 4), np.uint8)])
    with pytest.raises(InputError, match="area scales"):
        tune_gate([prob, prob], [truth, truth], area_scale=[1.0])
    with pytest.raises(ConfigError, match="min_area_px"):
        GateGrid(min_areas_px=())
    with pytest.raises(ConfigError, match="top_threshold"):
        GateGrid(top_thresholds=(0.5, 1.2))


def test_areas_exactly_at_the_limit_are_kept_as_in_apply_gate():
    prob = np.zeros((16, 16), np.float32)
    prob[2:6, 2:6] = 0.9  # 16 pixels: exactly the scaled limits below
    truth = (prob > 0).astype(np.uint8)
    grid = GateGrid(
        top_thresholds=(0.5,),
        min_areas_px=(64,),
        bottom_thresholds=(0.5,),
        min_component_areas_px=(64, 68),
    )
    results = tune_gate([prob], [truth], grid, area_scale=0.25)
    scores = {r.gate.min_component_area_px: r.mean_dice for r in results}
    assert scores == {64: 1.0, 68: 0.0}
    assert apply_gate(prob, Gate(0.5, 64, 0.5, 64), 0.25).sum() == 16
    assert apply_gate(prob, Gate(0.5, 64, 0.5, 68), 0.25).sum() == 0
