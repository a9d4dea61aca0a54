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
