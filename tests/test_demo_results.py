"""``python -m gfnet_edge.train.demo_results``: prints the demo numbers, writes JSON only where
asked, and replaces the shipped ``demo_results.json`` only with ``--update-shipped``."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from gfnet_edge.train import demo_results as dr

SENTINEL = '{"sentinel": true}\n'


@pytest.fixture()
def assets(tmp_path, monkeypatch):
    """The shipped results file moved to a scratch assets folder (the checkpoints stay the shipped ones)."""
    folder = tmp_path / "assets"
    folder.mkdir()
    results = folder / "demo_results.json"
    results.write_text(SENTINEL)
    monkeypatch.setattr(dr, "ASSETS", folder)
    monkeypatch.setattr(dr, "RESULTS_PATH", results)
    return results


def run(argv, capsys):
    try:
        code = dr.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


SMALL = ["--val-size", "4", "--test-size", "4", "--threads", "1"]


def test_by_default_prints_the_table_and_writes_nothing(assets, tmp_path, capsys):
    code, out, err = run(SMALL, capsys)
    assert code == 0, err
    assert "anytime acc, policy" in out and "targets:" in out and "wrote" not in out
    assert assets.read_text() == SENTINEL
    assert sorted(p.name for p in assets.parent.iterdir()) == ["demo_results.json"]


def test_json_writes_the_results_where_asked(assets, tmp_path, capsys):
    target = tmp_path / "small.json"
    code, out, err = run(SMALL + ["--json", target], capsys)
    assert code == 0, err
    res = json.loads(target.read_text())
    assert res["test_images"] == 4 and res["val_images"] == 4 and len(res["anytime_accuracy"]) == 3
    assert "test500_anytime_accuracy" not in res  # fewer than 500 test images
    assert assets.read_text() == SENTINEL


@pytest.mark.parametrize("extra, message", [
    (["--json", "{assets}/demo_results.json"], "refusing to write into the package's assets"),
    (["--json", "{assets}/other.json"], "refusing to write into the package's assets"),
    (["--json", "{tmp}/no/such/folder/x.json"], "no such folder"),
    (["--update-shipped"], "--update-shipped measures on the shipped splits: --val-size must be 500, got 4"),
    (["--update-shipped", "--json", "{tmp}/x.json"], "give it without --json"),
])
def test_refuses_before_measuring(assets, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(dr, "measure", lambda *a, **k: pytest.fail("measured before refusing"))
    extra = [e.format(assets=assets.parent, tmp=tmp_path) for e in extra]
    code, out, err = run(SMALL + extra, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert assets.read_text() == SENTINEL


def test_update_shipped_needs_the_shipped_checkpoints(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dr, "measure", lambda *a, **k: pytest.fail("measured before refusing"))
    other = tmp_path / "other.pth.tar"
    other.write_bytes(dr.GFNET_PATH.read_bytes())
    code, out, err = run(["--update-shipped", "--gfnet", other], capsys)
    assert code == 2 and "--gfnet must be" in err and len(err.strip().splitlines()) == 1
    assert assets.read_text() == SENTINEL


@pytest.mark.parametrize("option, value", [("--test-size", "-3"), ("--val-size", "0"), ("--threads", "0"),
                                           ("--seed", "-1"), ("--test-size", "ten")])
def test_bad_integer_options_are_one_line_errors(assets, capsys, option, value):
    code, out, err = run([option, value], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and f"argument {option}" in err, err


def test_missing_checkpoint_is_a_one_line_error(assets, tmp_path, capsys):
    code, out, err = run(SMALL + ["--gfnet", tmp_path / "none.pth.tar"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "checkpoint file not found" in err, err


def test_update_shipped_replaces_the_shipped_results(assets, capsys, monkeypatch):
    """With the shipped checkpoints and splits (shrunk here to 4 images, and the 500-image
    prefix to 2): the file is replaced, the shipped training record is kept."""
    assets.write_text(json.dumps({"training_minutes": {"ppo": 2.7}, "anytime_accuracy": [0, 0, 0]}))
    monkeypatch.setattr(dr, "SHIPPED_VAL_SIZE", 4)
    monkeypatch.setattr(dr, "SHIPPED_TEST_SIZE", 4)
    monkeypatch.setattr(dr, "TEST500", 2)
    code, out, err = run(["--update-shipped", "--threads", "1"], capsys)
    assert code == 0, err
    res = json.loads(assets.read_text())
    assert res["test_images"] == 4 and res["training_minutes"] == {"ppo": 2.7}
    assert len(res["test500_anytime_accuracy"]) == 3 and f"wrote {assets}" in out


def test_table_gives_the_share_of_static_macs_rounded_once():
    """The budgeted line's share is the MACs ratio rounded once: 40,653 of 100,000 multiply-adds
    is 40.653 %, printed 40.7 %, not the 40.6 % that rounding the stored four-digit fraction
    (0.4065) a second time gives (the shipped model's 40.65 % reads 40.7 % in the README)."""
    r = json.loads(dr.RESULTS_PATH.read_text())  # every field the table prints
    r.update(cheapest_macs_reaching_static=40653.0, static_macs=100000.0, fraction_of_static_macs=round(0.40653, 4))
    assert "= 40.7% of static" in dr.table(r)
