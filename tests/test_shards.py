"""`predict --shard K/N` and `pneumo merge-predictions`: N parts merged equal one run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.inference import shards

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_parse_shard_and_the_choice_of_inputs() -> None:
    assert shards.parse_shard("3/8") == (3, 8)
    for bad in ("0/4", "5/4", "1/0", "x/2", "1", "1/2/3", "-1/2"):
        with pytest.raises(shards.UsageError, match="expected K/N with 1 <= K <= N"):
            shards.parse_shard(bad)
    ids = [f"1.2.840.{i}" for i in range(400)]
    parts = [shards.select_shard([(i, None) for i in ids], [], (k, 4))[0] for k in (1, 2, 3, 4)]
    chosen = [image_id for part in parts for image_id, _ in part]
    assert sorted(chosen) == sorted(ids)  # every input in exactly one part
    assert all(60 <= len(part) <= 140 for part in parts)  # about a quarter each
    # The part depends on the ImageId only, not on the listing order.
    backwards = shards.select_shard([(i, None) for i in reversed(ids)], [], (2, 4))[0]
    assert sorted(backwards) == sorted(parts[1])


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_merged_parts_equal_one_run_byte_for_byte(tiny_run, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(tiny_run["raw"], raw)
    (raw / "broken.dcm").write_bytes(b"not a dicom")  # a rejected input goes to one part too
    common = ["--run", tiny_run["run"], "--precision", "fp32", "--save-probs", "--quiet"]
    whole = invoke("predict", raw, "--out", tmp_path / "whole", *common)
    assert whole.exit_code == 0, whole.output
    parts = []
    for k in (1, 2, 3):
        part = tmp_path / f"part{k}"
        result = invoke("predict", raw, "--out", part, "--shard", f"{k}/3", *common, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["shard"] == f"{k}/3"
        parts.append(part)
    sizes = [len(list((p / "masks").iterdir())) for p in parts]
    assert all(sizes) and sum(sizes) == len(list((tmp_path / "whole" / "masks").iterdir()))

    # A part cannot be resumed as another part, nor as the whole job.
    clash = invoke("predict", raw, "--out", parts[0], "--shard", "2/3", *common)
    assert clash.exit_code == 1 and "shard" in clash.stderr

    merged = invoke("merge-predictions", *reversed(parts), "--out", tmp_path / "merged", "--json")
    assert merged.exit_code == 0, merged.output
    assert json.loads(merged.stdout)["parts"] == 3
    expected = _files(tmp_path / "whole")
    assert "rejected.csv" in expected and "job.json" in expected
    assert _files(tmp_path / "merged") == expected


def test_merge_refuses_incomplete_or_mixed_parts(tiny_run, tmp_path: Path) -> None:
    # The engine is pinned: with `auto`, the float32 check may choose another engine for the TTA
    # job, and the merge would name that difference too (seen in CI).
    common = ["--run", tiny_run["run"], "--precision", "fp32", "--engine", "keras", "--quiet"]
    cache = ["--cache", tiny_run["cache"], "--split", "test"]
    for k in (1, 2):
        result = invoke(
            "predict", *cache, "--out", tmp_path / f"p{k}", "--shard", f"{k}/2", *common
        )
        assert result.exit_code == 0, result.output
    other = invoke("predict", *cache, "--out", tmp_path / "hflip", "--shard", "2/2", "--tta",
                   "hflip", *common)  # fmt: skip
    assert other.exit_code == 0, other.output
    cases = [
        ([tmp_path / "p1"], "part 2/2 is missing"),
        ([tmp_path / "p1", tmp_path / "p1"], "are both part 1/2"),
        ([tmp_path / "p1", tmp_path / "hflip"], "differ in tta"),
        ([tmp_path / "p1", tmp_path / "nothing"], "has no job.json"),
    ]
    for folders, message in cases:
        result = invoke("merge-predictions", *folders, "--out", tmp_path / "m")
        assert result.exit_code == 1, result.output
        assert message in result.stderr, result.stderr
        assert not (tmp_path / "m").exists()
    (tmp_path / "p2" / "predictions.csv").unlink()  # as if part 2 was killed
    result = invoke("merge-predictions", tmp_path / "p1", tmp_path / "p2", "--out", tmp_path / "m")
    assert result.exit_code == 1 and "is unfinished" in result.stderr
    result = invoke("predict", *cache, "--out", tmp_path / "x", "--shard", "3/2", *common)
    assert result.exit_code == 2 and "expected K/N" in result.stderr


def test_merge_takes_only_the_images_each_part_lists(tiny_run, tmp_path: Path) -> None:
    common = ["--run", tiny_run["run"], "--precision", "fp32", "--engine", "keras", "--quiet"]
    cache = ["--cache", tiny_run["cache"], "--split", "test"]
    whole = invoke("predict", *cache, "--out", tmp_path / "whole", *common)
    assert whole.exit_code == 0, whole.output
    for k in (1, 2):
        result = invoke(
            "predict", *cache, "--out", tmp_path / f"p{k}", "--shard", f"{k}/2", *common
        )
        assert result.exit_code == 0, result.output
    part = tmp_path / "p1"
    # Left by an earlier job in the folder (or an input since removed), and by a kill -9.
    stale = dict(json.loads(next((part / "records").glob("*.json")).read_text()), ImageId="old")
    (part / "records" / "old.json").write_text(json.dumps(stale))
    shutil.copyfile(next((part / "masks").glob("*.png")), part / "masks" / "old.png")
    (part / "records" / ".pneumo-tmp-123-x.json").write_text('{"ImageId": "cut sho')
    merged = invoke("merge-predictions", part, tmp_path / "p2", "--out", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    assert _files(tmp_path / "merged") == _files(tmp_path / "whole")

    listed = (part / "predictions.csv").read_text().splitlines()[1].split(",")[0]
    (part / "records" / f"{listed}.json").write_text("{not json")
    broken = invoke("merge-predictions", part, tmp_path / "p2", "--out", tmp_path / "m2")
    assert broken.exit_code == 1, broken.output
    assert f"{listed}.json is missing or unreadable" in broken.stderr
    assert "predict that part again" in broken.stderr and not (tmp_path / "m2").exists()


def test_a_call_removes_its_finished_mark_until_it_finishes(tmp_path: Path) -> None:
    import numpy as np

    from pneumo_cli.inference.postprocess import Gate
    from pneumo_cli.inference.predict import predict_sources
    from pneumo_cli.inference.sources import Item

    class Zero:
        tta, precision, engine = "none", "fp32", "keras"
        precision_reason, precision_check = "", None
        gate = Gate()

        def probabilities(self, images):
            return np.zeros(images.shape, np.float32)

    def load(index: int) -> Item:
        if index < 0:
            raise RuntimeError("killed")  # not a rejection: the call stops, as if killed
        return Item(f"img{index}", np.zeros((32, 32), np.uint8), (0, 32, 0, 32), (32, 32))

    out = tmp_path / "out"
    predict_sources(Zero(), [("img1", 1), ("img2", 2)], out, load=load)
    assert (out / "predictions.csv").is_file() and (out / "submission.csv").is_file()
    with pytest.raises(RuntimeError):
        predict_sources(Zero(), [("img1", 1), ("img3", -1)], out, load=load, overwrite=True)
    assert not (out / "predictions.csv").exists() and not (out / "submission.csv").exists()


def test_a_part_whose_inputs_are_all_rejected_finishes_and_the_merge_decides(
    tiny_run, tmp_path: Path
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "broken.dcm").write_bytes(b"not a dicom")
    common = ["--run", tiny_run["run"], "--precision", "fp32", "--engine", "keras", "--quiet"]
    whole = invoke("predict", raw, "--out", tmp_path / "whole", *common)
    assert whole.exit_code == 1 and "no input could be predicted" in whole.stderr
    part = invoke("predict", raw, "--out", tmp_path / "p1", "--shard", "1/1", *common)
    assert part.exit_code == 0, part.output
    assert "warning: part 1/1: no input could be predicted (1 rejected" in part.stderr
    assert (tmp_path / "p1" / "predictions.csv").read_text().count("\n") == 1  # header only
    assert "broken.dcm" in (tmp_path / "p1" / "rejected.csv").read_text()
    merged = invoke("merge-predictions", tmp_path / "p1", "--out", tmp_path / "m")
    assert merged.exit_code == 1 and "no input of any part could be predicted" in merged.stderr
    assert not (tmp_path / "m").exists()


def test_saving_probability_maps_is_part_of_the_job(tiny_run, tmp_path: Path) -> None:
    common = ["--run", tiny_run["run"], "--precision", "fp32", "--engine", "keras", "--quiet"]
    cache = ["--cache", tiny_run["cache"], "--split", "test"]
    first = invoke("predict", *cache, "--out", tmp_path / "p1", "--shard", "1/2", *common)
    assert first.exit_code == 0, first.output
    job = json.loads((tmp_path / "p1" / "job.json").read_text())
    assert "save_probs" not in job  # folders without maps keep the job they had
    resumed = invoke("predict", *cache, "--out", tmp_path / "p1", "--shard", "1/2", "--save-probs",
                     *common)  # fmt: skip
    assert resumed.exit_code == 1 and "save_probs" in resumed.stderr, resumed.output
    second = invoke("predict", *cache, "--out", tmp_path / "p2", "--shard", "2/2", "--save-probs",
                    *common)  # fmt: skip
    assert second.exit_code == 0, second.output
    merged = invoke("merge-predictions", tmp_path / "p1", tmp_path / "p2", "--out", tmp_path / "m")
    assert merged.exit_code == 1 and "differ in save_probs" in merged.stderr, merged.output


def test_rejected_names_that_are_not_utf8_sort_alike_in_a_run_and_a_merge(tmp_path: Path) -> None:
    from pneumo_cli.inference.outputs import write_rejected

    rows = [("caf\udce9.dcm", "not a DICOM"), ("cafz.dcm", "not a DICOM")]  # \udce9: byte 0xE9
    write_rejected(tmp_path / "run.csv", rows)
    again = shards._read_rejected(tmp_path / "run.csv")  # as a merge reads a part's file
    assert again[0][0] == "caf\\udce9.dcm"
    write_rejected(tmp_path / "merged.csv", again)
    assert (tmp_path / "merged.csv").read_bytes() == (tmp_path / "run.csv").read_bytes()
