"""Offline scoring on RLE files made from the real SIIM rows, the outputs and the command."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.errors import InputError, RleError
from pneumo_cli.core.metrics import dice_score, iou_score
from pneumo_cli.evaluation.report import ReportPanel
from pneumo_cli.evaluation.results import PER_IMAGE_COLUMNS, select_cases
from pneumo_cli.evaluation.scoring import score_masks, score_submission, write_evaluation
from pneumo_cli.io.rle import decode_union, encode_rle, read_rle_csv

runner = CliRunner()
REAL_IMAGES, REAL_POSITIVES = 12047, 2669  # facts of ../shared/siim/csv/train-rle.csv.gz


@pytest.fixture(scope="module")
def real_rows(real_rle_csv: Path) -> dict[str, list[str]]:
    """ImageId -> its RLE strings, in file order, from the real stage-2 training labels."""
    grouped: dict[str, list[str]] = {}
    for row in read_rle_csv(real_rle_csv):
        grouped.setdefault(row.image_id, []).append(row.encoded)
    return grouped


def write_csv(path: Path, rows: list[tuple[str, ...]], header=("ImageId", "EncodedPixels")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_the_real_file_scored_against_itself_is_perfect(real_rle_csv):
    evaluation = score_submission(real_rle_csv, real_rle_csv)
    m = evaluation.metrics
    assert (m["n_images"], m["n_positive"]) == (REAL_IMAGES, REAL_POSITIVES)
    assert m["mean_dice"] == 1.0 and m["mean_iou"] == 1.0
    assert m["positive_mean_dice"] == 1.0
    assert m["confusion_matrix"] == {"tp": 2669, "fp": 0, "fn": 0, "tn": 9378}
    area = {r.image_id: r.truth_area for r in evaluation.rows}
    # The union of the 4 overlapping annotations, not their sum.
    assert area["1.2.276.0.7230010.3.1.4.8323329.307.1517875162.311533"] == 69274
    assert area["1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319"] == 10133


def test_an_all_empty_submission_scores_the_fraction_of_empty_images(real_rle_csv, tmp_path):
    ids = list(dict.fromkeys(r.image_id for r in read_rle_csv(real_rle_csv)))
    predictions = write_csv(tmp_path / "empty.csv", [(i, "-1") for i in ids])
    m = score_submission(predictions, real_rle_csv).metrics
    assert m["mean_dice"] == (REAL_IMAGES - REAL_POSITIVES) / REAL_IMAGES
    assert m["mean_iou"] == m["mean_dice"]
    assert m["positive_mean_dice"] == 0.0
    assert (m["sensitivity"], m["specificity"], m["precision"]) == (0.0, 1.0, None)


def test_single_row_unions_and_shifted_masks_match_mask_based_scores(real_rows, tmp_path):
    """Re-encode real (multi-row) masks as one row, shift some: scores equal the mask maths."""
    positives = [i for i, rows in real_rows.items() if rows != ["-1"]]
    multi = [i for i in positives if len(real_rows[i]) > 1][:15]
    chosen = multi + [i for i in positives if i not in multi][:25]
    negatives = [i for i, rows in real_rows.items() if rows == ["-1"]][:10]
    truth_rows, pred_rows, expected = [], [], {}
    for n, image_id in enumerate(chosen):
        mask = decode_union(real_rows[image_id])
        pred = np.roll(mask, 7 * (n % 3), axis=n % 2)  # a third unshifted, others moved
        truth_rows += [(image_id, s) for s in real_rows[image_id]]
        pred_rows.append((image_id, encode_rle(pred)))
        expected[image_id] = (dice_score(mask, pred), iou_score(mask, pred))
    for image_id in negatives:
        truth_rows.append((image_id, "-1"))
        pred_rows.append((image_id, "-1"))
        expected[image_id] = (1.0, 1.0)
    fp_id = negatives[0]
    pred_rows[-len(negatives)] = (fp_id, "5 3")  # 3 false-positive pixels on an empty image
    expected[fp_id] = (0.0, 0.0)
    truth = write_csv(tmp_path / "truth.csv", truth_rows)
    predictions = write_csv(tmp_path / "pred.csv", pred_rows)
    evaluation = score_submission(predictions, truth)
    got = {r.image_id: (r.dice, r.iou) for r in evaluation.rows}
    assert got.keys() == expected.keys()
    for image_id, (dice, iou) in expected.items():
        assert got[image_id] == pytest.approx((dice, iou), abs=1e-12)
    assert got[chosen[0]] == (1.0, 1.0)
    assert evaluation.metrics["mean_dice"] == pytest.approx(
        np.mean([d for d, _ in expected.values()])
    )
    assert evaluation.metrics["confusion_matrix"]["fp"] == 1


def small_files(tmp_path: Path) -> tuple[Path, Path]:
    truth = write_csv(tmp_path / "t.csv", [("a", "0 4"), ("b", "-1"), ("c", "-1"), ("d", "10 2")])
    return truth, tmp_path / "p.csv"


def test_missing_ids_are_an_error_unless_allowed(tmp_path):
    truth, predictions = small_files(tmp_path)
    write_csv(predictions, [("a", "0 4"), ("b", "-1"), ("x", "-1")])
    with pytest.raises(InputError) as info:
        score_submission(predictions, truth)
    message = str(info.value)
    assert "2 ImageId(s) missing from" in message and "'c'" in message
    assert "1 ImageId(s) missing from" in message and "'x'" in message
    assert "--allow-missing" in message
    m = score_submission(predictions, truth, allow_missing=True).metrics
    assert m["n_images"] == 2 and m["mean_dice"] == 1.0
    assert m["missing"]["not_in_predictions"] == 2 and m["missing"]["not_in_truth"] == 1
    assert m["missing"]["examples_not_in_predictions"] == ["c", "d"]


def test_no_common_ids_is_an_error(tmp_path):
    truth, predictions = small_files(tmp_path)
    write_csv(predictions, [("y", "-1")])
    with pytest.raises(InputError, match="no ImageId in common"):
        score_submission(predictions, truth, allow_missing=True)


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [("3 4 5", "odd number"), ("1 x", "not an integer"), ("0 2000000", "past the")],
)
def test_malformed_rle_names_file_line_and_image(tmp_path, encoded, reason):
    truth, predictions = small_files(tmp_path)
    write_csv(predictions, [("a", "0 4"), ("b", "-1"), ("c", encoded), ("d", "10 2")])
    with pytest.raises(RleError, match=reason) as info:
        score_submission(predictions, truth)
    assert f"{predictions} line 4 (ImageId 'c')" in str(info.value)


def test_max_prob_column_gives_the_roc_auc(tmp_path):
    truth, predictions = small_files(tmp_path)
    header = ("ImageId", "has_pneumothorax", "max_prob", "EncodedPixels")
    rows = [("a", 1, 0.9, "0 4"), ("b", 0, 0.9, "-1"), ("c", 0, 0.2, "-1"), ("d", 1, 0.4, "-1")]
    write_csv(predictions, rows, header)
    m = score_submission(predictions, truth).metrics
    # Positives a (0.9), d (0.4); negatives b (0.9), c (0.2): pairs 0.5 + 1 + 0 + 1 = 2.5 of 4.
    assert m["roc_auc"] == 0.625
    assert m["has_probabilities"] is True
    assert m["confusion_matrix"] == {"tp": 1, "fp": 0, "fn": 1, "tn": 2}
    rows[1] = ("b", 0, "high", "-1")
    write_csv(predictions, rows, header)
    with pytest.raises(InputError, match="line 3 .*'b'.*max probability 'high'"):
        score_submission(predictions, truth)


def test_score_masks_and_case_selection():
    empty = np.zeros((4, 4), np.uint8)
    full = np.ones((4, 4), np.uint8)
    half = full.copy()
    half[:2] = 0
    items = [
        ("tn", empty, empty, 0.1),
        ("fp", empty, half, 0.8),
        ("fn-big", full, empty, 0.3),
        ("fn-small", half, empty, 0.2),
        ("tp", full, half, 0.7),
    ]
    evaluation = score_masks(items, details={"split": "val"})
    assert [r.outcome for r in evaluation.rows] == ["TN", "FP", "FN", "FN", "TP"]
    assert evaluation.metrics["split"] == "val"
    assert evaluation.metrics["mean_dice"] == pytest.approx((1 + 0 + 0 + 0 + 2 * 8 / 24) / 5)
    # Positives 0.3, 0.2, 0.7 against negatives 0.1, 0.8: each beats 0.1 only, 3 of 6 pairs.
    assert evaluation.metrics["roc_auc"] == 0.5
    cases = select_cases(evaluation.rows)
    assert [r.image_id for r in cases["false_negatives"]] == ["fn-big", "fn-small"]
    assert [r.image_id for r in cases["false_positives"]] == ["fp"]
    assert [r.image_id for r in cases["lowest_dice"]] == ["tp"]
    with pytest.raises(InputError, match="ImageId 'bad'"):
        score_masks([("bad", empty, np.zeros((2, 2), np.uint8), None)])


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def test_outputs_and_report_links_exist(tmp_path):
    empty = np.zeros((4, 4), np.uint8)
    full = np.ones((4, 4), np.uint8)
    items = [("neg", empty, empty, 0.2), ("pos", full, empty, 0.6), ("fp", empty, full, 0.7)]
    evaluation = score_masks(items)
    panel = tmp_path / "overlays" / "pos panel.png"
    panel.parent.mkdir()
    shutil.copyfile(Path(__file__).parent.parent / "pyproject.toml", panel)  # any file will do
    panels = [ReportPanel("false_negatives", "pos", panel, "pos: missed")]
    out = tmp_path / "eval"
    written = write_evaluation(evaluation, out, panels)
    names = {"metrics.json", "per_image.csv", "roc.png", "pr.png", "dice_hist.png", "report.html"}
    assert set(written) == names
    assert {p.name for p in out.iterdir()} == names
    for name in ("roc.png", "pr.png", "dice_hist.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == evaluation.metrics
    with open(out / "per_image.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert tuple(table[0]) == PER_IMAGE_COLUMNS
    assert table[2] == ["pos", "16", "0", "0.0", "0.0", "0.6", "FN"]
    parser = _Links()
    parser.feed((out / "report.html").read_text())
    assert "../overlays/pos%20panel.png" in parser.links
    assert len(parser.links) >= 6
    for link in parser.links:
        from urllib.parse import unquote

        assert not link.startswith(("/", "http", "file:")), link
        assert (out / unquote(link)).is_file(), link
    with pytest.raises(InputError, match="does not exist"):
        write_evaluation(evaluation, out, [ReportPanel("lowest_dice", "x", tmp_path / "nope.png")])


def find_chromium() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip


def chromium_or_skip() -> str:
    """Chromium's path; without it the test skips, and fails under CI=true (.ci/run installs
    Debian's chromium)."""
    browser = find_chromium()
    if browser is None:
        message = "Chromium is not installed (/usr/bin/chromium); the report is checked by parsing"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI must have it (.ci/run installs it)")
        pytest.skip(message)
    return browser


def run_chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )


def two_image_report(tmp_path: Path) -> Path:
    """The evaluation folder (report.html and its plots) of one negative and one positive image."""
    empty = np.zeros((4, 4), np.uint8)
    full = np.ones((4, 4), np.uint8)
    out = tmp_path / "eval"
    write_evaluation(score_masks([("neg", empty, empty, 0.2), ("pos", full, full, 0.6)]), out)
    return out


def test_report_renders_in_headless_chromium(tmp_path):
    browser = chromium_or_skip()
    import cv2

    out = two_image_report(tmp_path)
    shot = tmp_path / "shot.png"
    run_chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600",
                 (out / "report.html").as_uri())  # fmt: skip
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[0] > 100
    assert image.std() > 10  # not a blank page
    # The TN bars of dice_hist.png (#56B4E9) are on screen: the relative image links loaded.
    tn_blue = np.all(np.abs(image.astype(int) - (233, 180, 86)) <= 3, axis=2)
    assert tn_blue.sum() > 200


def test_every_image_the_report_references_loads_in_chromium(tmp_path):
    """The report's own <img> tags, copied into a probe page beside it that records each
    image's decoded width once the page has loaded; Chromium prints the resulting DOM."""
    import re

    browser = chromium_or_skip()
    out = two_image_report(tmp_path)
    images = re.findall(r"<img [^>]*>", (out / "report.html").read_text())
    assert len(images) >= 3
    probe = out / "probe.html"
    probe.write_text(
        "<html><body>" + "".join(images) + "<p id='result'>pending</p><script>"
        "window.addEventListener('load', () => { document.getElementById('result').textContent"
        " = Array.from(document.images).map(i => i.getAttribute('src') + '=' + i.naturalWidth)"
        ".join(' '); });</script></body></html>"
    )
    dom = run_chromium(browser, tmp_path, "--virtual-time-budget=10000", "--dump-dom",
                       probe.as_uri()).stdout  # fmt: skip
    result = re.search(r"<p id=\"result\">([^<]*)</p>", dom)
    assert result is not None, dom[-500:]
    widths = dict(item.rsplit("=", 1) for item in result.group(1).split())
    assert len(widths) == len({re.search(r"src='([^']*)'", tag).group(1) for tag in images})
    assert all(int(width) > 0 for width in widths.values()), widths


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_cli_offline_json_and_default_out_folder(tmp_path):
    truth, predictions = small_files(tmp_path)
    write_csv(predictions, [("a", "0 2"), ("b", "-1"), ("c", "-1"), ("d", "10 2")])
    result = runner.invoke(
        app, ["evaluate", "--predictions", str(predictions), "--truth", str(truth), "--json"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["mean_dice"] == pytest.approx((2 * 2 / 6 + 3) / 4)
    assert metrics["n_images"] == 4
    out = tmp_path / "eval-p"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "report.html").is_file()


def test_cli_table_and_explicit_out(tmp_path):
    truth, predictions = small_files(tmp_path)
    shutil.copyfile(truth, predictions)
    out = tmp_path / "elsewhere"
    result = runner.invoke(
        app,
        ["evaluate", "--predictions", str(predictions), "--truth", str(truth), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "Mean Dice (SIIM)" in result.stdout and "1.0000" in result.stdout
    assert (out / "per_image.csv").is_file()


def test_cli_errors_exit_1_with_one_line(tmp_path):
    truth, predictions = small_files(tmp_path)
    write_csv(predictions, [("a", "0 4 1"), ("b", "-1"), ("c", "-1"), ("d", "10 2")])
    result = runner.invoke(
        app, ["evaluate", "--predictions", str(predictions), "--truth", str(truth)]
    )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "line 2 (ImageId 'a')" in result.stderr and "odd number" in result.stderr
    write_csv(predictions, [("a", "0 4")])
    result = runner.invoke(
        app, ["evaluate", "--predictions", str(predictions), "--truth", str(truth)]
    )
    assert result.exit_code == 1 and "--allow-missing" in result.stderr
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--predictions",
            str(predictions),
            "--truth",
            str(truth),
            "--allow-missing",
            "--json",
        ],
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["n_images"] == 1
    assert "warning" in result.stderr


def test_cli_usage_errors_exit_2(tmp_path):
    truth, _ = small_files(tmp_path)
    assert runner.invoke(app, ["evaluate", "--truth", str(truth)]).exit_code == 2
    result = runner.invoke(
        app, ["evaluate", "--predictions", str(truth), "--truth", str(truth), "--tune"]
    )
    assert result.exit_code == 2
    assert runner.invoke(app, ["evaluate", "--split", "holdout"]).exit_code == 2


def test_cli_model_mode_needs_a_trained_run(tmp_path):
    result = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "runs" / "train")])
    assert result.exit_code == 1
    assert "is not a pneumo run (no config.json)" in result.stderr
    result = runner.invoke(app, ["evaluate", "--split", "test", "--tune"])
    assert result.exit_code == 1 and "refused" in result.stderr
