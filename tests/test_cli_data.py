"""`bench data pack | inspect | verify`, and `bench run` on a card-backed dataset (present and missing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_formats import image_array, png, write_insightface
from typer.testing import CliRunner

from bench.cli import app
from bench.records import iter_records

runner = CliRunner()


def _invoke(args):
    return runner.invoke(app, args, catch_exceptions=False)


def _folder(root, counts=(2, 3, 1), size=32):
    for identity, count in enumerate(counts):
        (root / f"id{identity}").mkdir(parents=True)
        for i in range(count):
            (root / f"id{identity}" / f"{i}.png").write_bytes(png(image_array(10 * identity + i, size)))


def _card(path, identities, images, layout="im2rec", size=32):
    path.write_text(f"name: tiny\ntitle: test\nformat: [recordio, folder]\nlayout: {{recordio: {layout}}}\n"
                    f"where: {{env: FACEBENCH_TINY_TEST, path: tiny}}\nidentities: {identities}\nimages: {images}\n"
                    f"image_size: [{size}, {size}]\nobtain: made by the test.\n")
    return str(path)


def test_pack_then_inspect(tmp_path) -> None:
    _folder(tmp_path / "faces")
    result = _invoke(["data", "pack", str(tmp_path / "faces"), str(tmp_path / "packed"), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 6 and summary["identities"] == 3 and summary["layout"] == "im2rec"
    assert (tmp_path / "packed" / "property").read_text() == "3,32,32\n"

    for target, fmt, layout in ((tmp_path / "packed", "recordio", "im2rec"),
                                (tmp_path / "packed" / "train.rec", "recordio", "im2rec"),
                                (tmp_path / "faces", "folder", "flat")):
        result = _invoke(["data", "inspect", str(target), "--no-progress"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        assert (info["format"], info["layout"], info["images"], info["identities"]) == (fmt, layout, 6, 3)
        assert info["images_per_identity"] == {"min": 1, "median": 2.0, "max": 3}
        assert info["image_size"] == [32, 32] and info["first_image_decoded_size"] == [32, 32]


def test_inspect_errors_are_one_line(tmp_path) -> None:
    _folder(tmp_path / "faces")
    _invoke(["data", "pack", str(tmp_path / "faces"), str(tmp_path / "packed"), "--no-progress"])
    rec = tmp_path / "packed" / "train.rec"
    rec.write_bytes(b"XXXX" + rec.read_bytes()[4:])
    result = _invoke(["data", "inspect", str(tmp_path / "packed"), "--no-progress"])
    assert result.exit_code == 2
    assert "bad magic" in result.stderr and "key" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = _invoke(["data", "inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_verify_against_a_card(tmp_path) -> None:
    _folder(tmp_path / "faces")
    _invoke(["data", "pack", str(tmp_path / "faces"), str(tmp_path / "packed"), "--no-progress"])
    good = _card(tmp_path / "good.yaml", 3, 6)
    result = _invoke(["data", "verify", "custom", "--card", good, "--path", str(tmp_path / "packed"), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["format"] == "recordio"
    assert sum(c["check"].startswith("decode") for c in report["checks"]) == 6  # 6 images, up to 16 shards

    # The folder itself also verifies (the card accepts both formats).
    result = _invoke(["data", "verify", "custom", "--card", good, "--path", str(tmp_path / "faces"), "--no-progress"])
    assert result.exit_code == 0 and json.loads(result.stdout)["format"] == "folder"

    wrong = _card(tmp_path / "wrong.yaml", 4, 6, layout="insightface")
    result = _invoke(["data", "verify", "custom", "--card", wrong, "--path", str(tmp_path / "packed"), "--no-progress"])
    assert result.exit_code == 1
    failed = {c["check"]: c for c in json.loads(result.stdout)["checks"] if not c["ok"]}
    assert set(failed) == {"identities", "layout", "property num_classes"}
    assert failed["identities"]["expected"] == 4 and failed["identities"]["found"] == 3
    assert "identities" in result.stderr


def test_verify_reports_an_undecodable_shard(tmp_path) -> None:
    groups = [[png(image_array(i, 32)) for i in range(3)], [b"\xff\xd8 broken", png(image_array(9, 32))]]
    write_insightface(tmp_path / "data", groups, size=32)
    card = _card(tmp_path / "c.yaml", 2, 5, layout="insightface")
    result = _invoke(["data", "verify", "custom", "--card", card, "--path", str(tmp_path / "data"), "--no-progress"])
    assert result.exit_code == 1
    bad = [c for c in json.loads(result.stdout)["checks"] if not c["ok"]]
    assert len(bad) == 1 and "key 4 at offset" in bad[0]["found"] and "undecodable" in bad[0]["found"]


def test_missing_dataset_fails_with_one_line(tmp_path, monkeypatch, tiny_args) -> None:
    monkeypatch.delenv("FACEBENCH_MS1MV2", raising=False)
    result = _invoke(["run", "--dataset", "ms1mv2", "--methods", "arcface", *tiny_args])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "set FACEBENCH_MS1MV2=DIR (or --set data.path=DIR)" in result.stderr
    assert not list((tmp_path / "results").glob("*/config.yaml"))
    result = _invoke(["data", "verify", "ms1mv2", "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "FACEBENCH_MS1MV2" in result.stderr


@pytest.mark.slow
def test_bench_run_on_a_packed_folder(tmp_path, tiny_args) -> None:
    """End to end: pack a folder, then train and evaluate on it with two decoding workers (slow: the evaluation
    renders its 112 x 112 pairs)."""
    # 112 x 112: evaluation feeds models trained on real data insightface's 112 x 112 crops.
    _folder(tmp_path / "faces", counts=(4,) * 8, size=112)
    _invoke(["data", "pack", str(tmp_path / "faces"), str(tmp_path / "packed"), "--no-progress"])
    card = _card(tmp_path / "tiny.yaml", 8, 32, size=112)
    result = _invoke(["run", "--dataset", "custom", "--methods", "arcface", "--split", "shallow",
                      "--set", f"data.card={card}", "--set", f"data.path={tmp_path / 'packed'}",
                      "--set", "data.workers=2", *tiny_args])
    assert result.exit_code == 0, result.output
    (record,) = iter_records(tmp_path / "results")
    assert record["data"]["dataset"] == "tiny" and record["data"]["source"]["layout"] == "im2rec"
    assert record["data"]["split"]["images"] == 16 and record["config"]["num_classes"] == 8
    assert np.isfinite(record["train"][-1]["loss"])
