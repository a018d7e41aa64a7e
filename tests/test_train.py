"""Smoke tests of the demo training (tiny sizes, a few iterations of every stage; < 60 s)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("sklearn")

from gfnet_edge.models.checkpoint import load_checkpoint, read_checkpoint_dict  # noqa: E402
from gfnet_edge.train import cli  # noqa: E402
from gfnet_edge.train.config import demo_spec, tiny_config  # noqa: E402
from gfnet_edge.train.data import Batches, centred_coords, load_split, target_actions  # noqa: E402
from gfnet_edge.train.recipe import StagePlan  # noqa: E402
from gfnet_edge.train.stages import Run  # noqa: E402
from gfnet_edge.train.static import load_static  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One generated-data cache for the module (the tiny splits are rendered once)."""
    d = tmp_path_factory.mktemp("cache")
    old = os.environ.get("GFNET_EDGE_CACHE")
    os.environ["GFNET_EDGE_CACHE"] = str(d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and the test may share the CPU
    cfg = tiny_config()
    for split, n in (("train", cfg.train_size), ("val", cfg.val_size), ("test", cfg.test_size)):
        load_split(split, n, config=cfg.data(), progress=False)
    yield d
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("GFNET_EDGE_CACHE", None)
    else:
        os.environ["GFNET_EDGE_CACHE"] = old


def _tiny_run(tmp_path, n_train=8, **kw):
    cfg = tiny_config(train_size=n_train, **kw)
    dcfg = cfg.data()
    train = load_split("train", cfg.train_size, config=dcfg, progress=False)
    val = load_split("val", cfg.val_size, config=dcfg, progress=False)
    return Run(tmp_path / "run", cfg, train, val, progress=False, log=lambda s: None)


def _history(run, stage):
    return torch.load(run.stage_path(stage), map_location="cpu", weights_only=False)["history"]


def test_demo_spec_is_valid():
    spec = demo_spec("r16")
    assert (spec.image_size, spec.patch_size, spec.steps, spec.num_classes) == (224, 96, 3, 10)
    assert spec.classifier == "cascaded" and spec.step0 == "backbone" and spec.family == "custom"
    with pytest.raises(ValueError):
        demo_spec("nope")


def test_helpers():
    c = np.array([[10.0, 200.0], [112.0, 112.0]])
    xy = centred_coords(c, 224, 96)
    assert xy.tolist() == [[0, 128], [64, 64]]
    a = target_actions(c, 224, 96)
    assert a.min() >= 0 and a.max() <= 1 and np.allclose(a[1], 0.5)
    b = Batches(10, 4, 0)
    first = [b.next() for _ in range(3)]
    state = b.state()
    more = [b.next() for _ in range(3)]
    b2 = Batches(10, 4, 0)
    b2.load(state)
    assert all((x == y).all() for x, y in zip(more, [b2.next() for _ in range(3)]))
    assert all(len(x) == 4 for x in first)


def test_losses_decrease(tmp_path, cache):
    # One fixed batch (8 images, batch 8), no crop jitter: the loss must go down.
    run = _tiny_run(tmp_path, crop_jitter=0, pre_local=StagePlan(epochs=1, iters=12, batch=8, lr=3e-3, minutes=5.0),
                    static=StagePlan(epochs=1, iters=2, batch=4, lr=2e-3, minutes=5.0))
    run.pre_local(resume=False)
    h = _history(run, "pre_local")
    first_loss = h[0]["loss"]
    # compare the first and last iterations through a second short run from the trained weights
    run.cfg.pre_local = StagePlan(epochs=1, iters=3, batch=8, lr=1e-4, minutes=5.0)
    run.pre_local(resume=False)
    assert _history(run, "pre_local")[0]["loss"] < first_loss
    run.static_stage(resume=False)
    assert np.isfinite(_history(run, "static")[0]["loss"])


def test_resume_matches_uninterrupted(tmp_path, cache, monkeypatch):
    budget = StagePlan(epochs=2, iters=3, batch=4, lr=2e-3, minutes=5.0)
    a = _tiny_run(tmp_path / "a", pre_local=budget)
    a.pre_local(resume=False)
    want = {k: v.clone() for k, v in a.model.model.state_dict().items()}

    b = _tiny_run(tmp_path / "b", pre_local=budget)
    calls = {"n": 0}
    real = torch.optim.AdamW.step

    def flaky(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # dies in the second epoch, after the first checkpoint
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        b.pre_local(resume=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    ck = torch.load(b.stage_path("pre_local"), map_location="cpu", weights_only=False)
    assert ck["epoch"] == 1 and not ck["done"]
    c = _tiny_run(tmp_path / "b", pre_local=budget)  # a fresh process
    c.pre_local(resume=True)
    got = c.model.model.state_dict()
    for k, v in want.items():
        assert torch.allclose(v.float(), got[k].float(), atol=1e-6), k


def test_every_stage_and_export(tmp_path, cache):
    out = tmp_path / "demo"
    assets = tmp_path / "assets"
    rc = cli.main(["--out", str(out), "--tiny", "--no-progress", "--threads", "1", "--assets", str(assets)])
    assert rc == 0
    for stage in ("pre_local", "pre_glance", "stage1", "bc", "ppo", "stage3", "static"):
        ck = torch.load(out / f"{stage}.pt", map_location="cpu", weights_only=False)
        assert ck["done"], stage
        assert all(np.isfinite(v) for r in ck["history"] for v in r.values() if isinstance(v, float)), stage
    records = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} >= {"pre_local", "stage1", "ppo", "stage3", "static"}

    # released-format checkpoint round trip with the metadata the toolkit reads
    model = load_checkpoint(assets / "demo_gfnet.pth.tar")
    T = model.spec.steps
    raw = read_checkpoint_dict(assets / "demo_gfnet.pth.tar")
    assert all(v.dtype == torch.float16 for v in raw["model_state_dict"].values() if v.is_floating_point())
    assert len(model.meta["anytime_classification"]) == T
    assert np.asarray(model.meta["dynamic_threshold"]).shape == (39, T)
    assert len(model.meta["budgeted_batch_classification"]) == 2
    assert model.meta["missing_metadata"] == []
    assert raw["demo_data"]["config"] is not None

    net, meta = load_static(assets / "demo_static.pth.tar")
    assert meta["macs"] > model.meta["flops"][0] and "test_accuracy" in meta
    assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 10)
    res = json.loads((assets / "demo_results.json").read_text())
    assert len(res["anytime_accuracy"]) == T and "targets" in res

    # a finished run resumes as a no-op and re-exports the same weights
    rc = cli.main(["--out", str(out), "--resume", "--stage", "3", "--no-progress"])
    assert rc == 0


def test_bad_override_is_one_line_and_writes_nothing(tmp_path, capsys):
    for item, field in (("nope=1", "'nope'"), ("stage1.nope=1", "'stage1.nope'"), ("stage1.epochs=x", "not JSON"),
                        ('stage1.lr="fast"', 'stage1.lr takes a number, got "fast"'),
                        ("stage1.epochs=2.5", "stage1.epochs takes an integer"), ("amp=1", "amp takes true/false"),
                        ('stage1={"epochs": 2}', "stage1 takes the fields of StagePlan"),
                        ("pre_local.lr=-1", "pre_local.lr must be in (0, inf), got -1"),
                        ("weight_decay=NaN", "weight_decay must be in [0, inf), got nan"),
                        ("ppo.batch=-4", "ppo.batch must be in [0, inf), got -4")):
        rc = cli.main(["--out", str(tmp_path / "run"), "--tiny", "--no-progress", "--set", item])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("gfnet-edge: error:") and field in err[0], (item, err)
        assert not (tmp_path / "run").exists()


def test_every_option_help_lists_under_image_folder_training_is_refused_without_data(capsys):
    """The options `gfnet-edge train --help` lists under image-folder training are those
    FOLDER_OPTIONS names, in order, and the demo trainer (no --data) refuses each, naming it."""
    import re

    from gfnet_edge.cli import build_parser
    from gfnet_edge.cli import main as gfnet_edge
    from gfnet_edge.errors import InputError

    assert gfnet_edge(["train", "--help"]) == 0
    section = capsys.readouterr().out.split("image-folder training (--data):\n")[1].split("\n\n")[0]
    flags = []
    for line in section.splitlines():
        if line.startswith("  --"):
            flag, *metavar = re.split(r"\s{2,}", line.strip())[0].split()
            value = [metavar[0].strip("{}").split(",")[-1] if metavar[0].startswith("{") else "1"] if metavar else []
            with pytest.raises(InputError, match=f"^{flag} applies to training on an image folder: pass --data ROOT"):
                cli.check_demo_args(build_parser().parse_args(["train", flag, *value]))
            flags.append(flag)
    assert len(flags) == 12 and ["--" + name.replace("_", "-") for name in cli.FOLDER_OPTIONS] == flags


@pytest.mark.parametrize("args, needle", [
    (["--backbone", "resnet18"], "--backbone resnet18: without --data the demo GFNet is trained"),
    (["--pretrained", "weights.pth"], "--pretrained applies to training on an image folder: pass --data ROOT"),
    (["--epochs", "1"], "--epochs applies to training on an image folder"),
    (["--workers", "0"], "--workers applies to training on an image folder"),
    (["--image-size", "64"], "--image-size applies to training on an image folder"),
    (["--device", "cpu"], "--device applies to training on an image folder"),
])
def test_image_folder_options_without_data_are_refused_before_anything_runs(tmp_path, capsys, cache, args, needle):
    """A command meant for an image folder but missing --data would train the demo task (and
    ignore the option, or fail inside it): it ends with one line naming the option, writing nothing."""
    rc = cli.main(["--out", str(tmp_path / "run"), "--tiny", "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gfnet-edge: error:") and needle in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_demo_trainer_closes_its_log_when_an_error_ends_the_run(tmp_path, monkeypatch):
    """An error after RUN/train.txt is opened (here: the data cannot be made) ends the command
    with its one line, and the log file is closed (no ResourceWarning for it)."""
    import gc
    import warnings

    from gfnet_edge import cli
    from gfnet_edge.errors import InputError
    from gfnet_edge.train import data

    def no_data(*args, **kwargs):
        raise InputError("no data here")

    monkeypatch.setattr(data, "load_split", no_data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        rc = cli.main(["train", "-o", str(tmp_path / "run"), "--tiny", "--no-progress"])
        gc.collect()
    assert rc == 2 and (tmp_path / "run" / "train.txt").is_file()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and "train.txt" in str(w.message)]


def test_the_demo_trainer_refuses_a_resume_whose_options_would_change_the_run(tmp_path, monkeypatch, capsys):
    """--resume continues a demo run as its config.json says: --set, --seed or --backbone that
    would change a setting end the command with one line naming the settings, before anything
    is written; the same values as recorded go on (here to the data, which this test stops), and
    so do new workers / worker_start (how images are loaded), which config.json records."""
    from gfnet_edge import cli
    from gfnet_edge.errors import InputError
    from gfnet_edge.train import data
    from gfnet_edge.train.config import tiny_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config()
    (run / "config.json").write_text(cfg.dumps())
    recorded = (run / "config.json").read_bytes()
    resume = ["train", "-o", str(run), "--resume", "--no-progress", "--threads", "1"]
    for args, changed in ((["--set", "seed=7"], "seed"), (["--seed", "7", "--set", "stage1.lr=0.5"], "seed, stage1.lr"),
                          (["--backbone", "r24" if cfg.backbone != "r24" else "r16"], "backbone")):
        assert cli.main([*resume, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"the command line would change {changed}: leave those options out" in err[0], err
        assert (run / "config.json").read_bytes() == recorded and not (run / "train.txt").exists()

    def no_data(*args, **kwargs):
        raise InputError("no data here")

    monkeypatch.setattr(data, "load_split", no_data)
    assert cli.main([*resume, "--set", f"seed={cfg.seed}", "--seed", str(cfg.seed), "--backbone", cfg.backbone]) == 2
    assert capsys.readouterr().err.strip().endswith("no data here")
    # how images are loaded may change, as --workers / --worker-start on an image folder
    assert cli.main([*resume, "--set", "workers=3", "--set", 'worker_start="spawn"']) == 2
    assert capsys.readouterr().err.strip().endswith("no data here")
    assert json.loads((run / "config.json").read_text())["workers"] == 3


def test_one_stage_of_an_existing_demo_run_takes_the_runs_settings(tmp_path, monkeypatch, capsys):
    """`--stage N` on a demo run folder (docs/training.md: "one stage (earlier ones done)") takes
    the earlier stages' checkpoints, so it runs with the settings their run recorded in
    config.json, as --resume does: config.json keeps them (the demo's defaults do not replace
    the run's), and an option that would change one is refused in one line naming it."""
    from gfnet_edge import cli
    from gfnet_edge.errors import InputError
    from gfnet_edge.train import data
    from gfnet_edge.train.config import TrainConfig, tiny_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config()
    assert cfg.train_size != TrainConfig().train_size  # the recorded run is not the default one
    (run / "config.json").write_text(cfg.dumps())
    recorded = (run / "config.json").read_bytes()
    stage = ["train", "-o", str(run), "--stage", "2", "--no-progress", "--threads", "1"]
    assert cli.main([*stage, "--set", "seed=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the command line would change seed" in err[0], err
    assert (run / "config.json").read_bytes() == recorded

    seen = []

    def no_data(split, n, *args, **kwargs):
        seen.append((split, n))
        raise InputError("no data here")

    monkeypatch.setattr(data, "load_split", no_data)
    assert cli.main(stage) == 2
    assert capsys.readouterr().err.strip().endswith("no data here")
    assert seen == [("train", cfg.train_size)]
    kept = json.loads((run / "config.json").read_text())
    assert kept["train_size"] == cfg.train_size and kept["val_size"] == cfg.val_size
    assert kept["stage1"] == json.loads(recorded)["stage1"]


def test_a_new_demo_run_is_refused_in_a_folder_that_holds_a_runs_checkpoints(tmp_path, capsys):
    """The demo trainer without --resume or --stage on a folder holding a stage checkpoint stops
    in one line naming it and --resume, before it writes anything (it trained a new run over the
    old one's checkpoints); the image-folder trainer refuses the same."""
    from gfnet_edge import cli
    from gfnet_edge.train.config import tiny_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(tiny_config().dumps())
    (run / "pre_local.pt").write_bytes(b"a checkpoint")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert cli.main(["train", "-o", str(run), "--tiny", "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "pre_local.pt" in err[0] and "--resume" in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_tiny_on_a_continued_demo_run_is_refused_where_the_run_is_not_a_tiny_one(tmp_path, capsys):
    """--tiny names the tiny run's settings: on --resume / --stage of a run recorded with others it
    is refused in one line naming them, before anything is written (it was ignored without a
    word); on a tiny run it is accepted as repeating the recorded settings."""
    from gfnet_edge import cli
    from gfnet_edge.errors import InputError
    from gfnet_edge.train import data
    from gfnet_edge.train.config import TrainConfig, tiny_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(TrainConfig().dumps())
    recorded = (run / "config.json").read_bytes()
    for how in (["--resume"], ["--stage", "2"]):
        assert cli.main(["train", "-o", str(run), "--tiny", "--no-progress", "--threads", "1", *how]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "train_size" in err[0] and "(--tiny sets them)" in err[0], err
        assert (run / "config.json").read_bytes() == recorded

    (run / "config.json").write_text(tiny_config().dumps())

    def no_data(*args, **kwargs):
        raise InputError("no data here")

    import pytest
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_split", no_data)
        assert cli.main(["train", "-o", str(run), "--tiny", "--no-progress", "--threads", "1", "--resume"]) == 2
    assert capsys.readouterr().err.strip().endswith("no data here")  # past the settings check
