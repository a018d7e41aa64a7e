"""``gfnet-edge train --data``: a GFNet on a tiny image folder (seconds on 2 CPU cores).

The folder has 3 classes whose only cue is the colour of a 10 px square at a random place in a
64 px noise image; the backbones are timm's tiny ``test_*`` models.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from gfnet_edge import cli  # noqa: E402
from gfnet_edge.errors import InputError, UnavailableError  # noqa: E402
from gfnet_edge.models.checkpoint import load_checkpoint  # noqa: E402
from gfnet_edge.train import folder_stages  # noqa: E402
from gfnet_edge.train.folder_cli import STAGE_ORDER, train_folder  # noqa: E402
from gfnet_edge.train.folder_data import LAYOUT, scan_split  # noqa: E402
from gfnet_edge.train.pretrained import timm_pretrained_state  # noqa: E402
from gfnet_edge.train.recipe import FolderTrainConfig, family_defaults  # noqa: E402
from gfnet_edge.variants import VARIANTS  # noqa: E402

COLOURS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}
REPO = Path(__file__).resolve().parent.parent


def make_folder(root: Path, n_train: int = 8, n_val: int = 4, size: int = 64, classes=tuple(COLOURS), seed: int = 0):
    """``root/{train,val}/CLASS/i.png``: noise with a coloured square somewhere."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
                r, q = rng.integers(0, size - 10, 2)
                img[r:r + 10, q:q + 10] = COLOURS[c]
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A local 'pretrained' file: timm's test_efficientnet state dict with a 1000-class head."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("w") / "test_efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=1000).state_dict(), path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # tiny tensors: one thread is fastest, and the CPU may be shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(data, backbone="test_efficientnet", pretrained=None, epochs=(2, 1, 1), **kw) -> FolderTrainConfig:
    cfg = FolderTrainConfig(data=str(data), backbone=backbone, pretrained=str(pretrained) if pretrained else None,
                            image_size=64, patch_size=32, batch_size=6, workers=0)
    cfg.stage1.epochs, cfg.stage2.epochs, cfg.stage3.epochs = epochs
    cfg.stage1.lr = 3e-3
    for k, v in kw.items():
        cfg.set(k, v)
    return cfg


def _weights(run: Path, stage: str):
    return torch.load(run / f"{stage}.pt", map_location="cpu", weights_only=True)["models"]["gfnet"]


@pytest.fixture(scope="module")
def trained(folder, weights, tmp_path_factory):
    """An uninterrupted run, and the same run interrupted in stage 1's second epoch then resumed."""
    base = tmp_path_factory.mktemp("runs")
    res = train_folder(tiny_config(folder, pretrained=weights), base / "a")
    calls = {"n": 0}
    original = folder_stages.FolderTrainer.evaluate

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 2:  # end of stage 1's second epoch, before it is saved
            raise KeyboardInterrupt
        return original(self)

    folder_stages.FolderTrainer.evaluate = interrupting
    try:
        with pytest.raises(KeyboardInterrupt):
            train_folder(tiny_config(folder, pretrained=weights), base / "b")
    finally:
        folder_stages.FolderTrainer.evaluate = original
    interrupted = torch.load(base / "b" / "stage1.pt", map_location="cpu", weights_only=True)
    resumed = train_folder(tiny_config(folder, pretrained=weights), base / "b", resume=True)
    return base / "a", res, interrupted, base / "b", resumed


def test_a_ctrl_c_raised_where_python_ignores_exceptions_still_stops_training(folder, tmp_path, monkeypatch):
    """Ctrl-C that comes where Python ignores what is raised (a __del__: "Exception ignored in
    ...") stops training all the same, without that report. Here SIGINT comes inside a __del__
    during stage 1's first validation: the run stops after that epoch's checkpoint instead of
    training on to the end."""
    import signal

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    class Swallowed:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the KeyboardInterrupt raised in here is ignored

    original = folder_stages.FolderTrainer.evaluate

    def evaluate(self):
        Swallowed()
        return original(self)

    monkeypatch.setattr(folder_stages.FolderTrainer, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        train_folder(tiny_config(folder, epochs=(2, 1, 1)), tmp_path / "r")
    ck = torch.load(tmp_path / "r" / "stage1.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and not ck["done"] and not (tmp_path / "r" / "stage2.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert reported == [] and sys.unraisablehook == reported.append


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A data cache (GFNET_EDGE_CACHE) holding the demo trainer's --tiny splits, rendered once."""
    from gfnet_edge.train.config import tiny_config
    from gfnet_edge.train.data import load_split

    d = tmp_path_factory.mktemp("demo-cache")
    cfg = tiny_config()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GFNET_EDGE_CACHE", str(d))
        for split, n in (("train", cfg.train_size), ("val", cfg.val_size)):
            load_split(split, n, config=cfg.data(), progress=False)
    return d


def _train_argv(trainer: str, data: Path, run: Path):
    """``gfnet-edge train`` of a short run with 2 DataLoader workers: on the image folder ``data``
    (stage 1: 2 epochs of 4 batches), or the demo trainer's stage 1 (--tiny: 2 epochs of 2
    batches)."""
    if trainer == "folder":
        return ["train", "--data", str(data), "-o", str(run), "--backbone", "test_efficientnet", "--image-size", "64",
                "--patch-size", "32", "--epochs", "2,1,1", "--batch-size", "6", "--workers", "2", "--threads", "1",
                "--no-progress"]
    return ["train", "-o", str(run), "--tiny", "--stage", "1", "--set", "workers=2", "--threads", "1", "--no-progress"]


def _interrupted_cli_run(argv, moment: str, paused: int, start_method: str = "fork"):
    """``gfnet-edge ARGV`` in a child process (its own process group, as a job in a terminal)
    paused at ``moment`` (tests/train_interrupt_child.py) in ``paused`` processes, its DataLoader
    workers started by ``start_method``, then sent a Ctrl-C: SIGINT to the whole group, its
    DataLoader workers included."""
    import signal

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    env = {**os.environ, "GFNET_EDGE_TEST_READY": str(ready_w), "GFNET_EDGE_TEST_GO": str(go_r),
           "GFNET_EDGE_TEST_PAUSE": moment, "GFNET_EDGE_TEST_START_METHOD": start_method}
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "train_interrupt_child.py"), *argv], env=env,
                            pass_fds=(ready_w, go_r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # a suite run in the background inherits SIGINT ignored:
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's default
    os.close(ready_w)
    os.close(go_r)
    try:
        got = b""
        while len(got) < paused:
            byte = os.read(ready_r, 1)
            if not byte:
                break
            got += byte
        assert len(got) == paused, f"the run did not pause at {moment}: {proc.communicate(timeout=300)}"
        os.killpg(proc.pid, signal.SIGINT)
        os.write(go_w, b"g" * paused)
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(ready_r)
        os.close(go_w)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["folder", "demo"])
@pytest.mark.parametrize("moment, paused, saved, start_method", [
    ("workers", 2, None, "fork"),  # the training process and its first worker, as the worker starts
    ("val-workers", 2, None, "fork"),  # the same as stage 1's first validation starts its workers (before its save)
    ("mid-epoch", 1, 1, "fork"),  # stage 1's second epoch, its second batch
    ("checkpoint", 1, 1, "fork"),  # stage 1's first checkpoint, as it is written
    ("workers", 2, None, "spawn"),  # spawned workers (macOS's default) before their loop: no inherited handler
    ("val-workers", 2, None, "spawn"),
    ("workers", 2, None, "forkserver"),  # workers forked by a server process (Linux's default from Python 3.14)
])
def test_ctrl_c_ends_the_run_with_one_line_and_exit_130(folder, demo_cache, tmp_path, monkeypatch, trainer, moment,
                                                          paused, saved, start_method):
    """A real Ctrl-C at any moment of a run with DataLoader workers ends it with exit status 130
    and one line that says how to continue it (no traceback, no "Exception ignored in ..."), on
    an image folder and in the demo trainer alike, with workers forked or spawned. The stage
    checkpoint is the last finished epoch's, whole: one whose write the Ctrl-C came in is finished
    first, and no temporary file stays. The run then continues with --resume."""
    run = tmp_path / "run"
    monkeypatch.setenv("GFNET_EDGE_CACHE", str(demo_cache))
    rc, out, err = _interrupted_cli_run(_train_argv(trainer, folder, run), moment, paused, start_method)
    lines = err.strip().splitlines()
    assert rc == 130 and len(lines) == 1, (rc, err)
    assert lines[0].startswith("gfnet-edge: interrupted") and str(run) in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in out + err and "Exception ignored" not in out + err
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert [p.name for p in run.glob("*.pt")] == ([] if saved is None else ["stage1.pt"])
    if saved is not None:
        ck = torch.load(run / "stage1.pt", map_location="cpu", weights_only=True)
        assert ck["epoch"] == saved and not ck["done"] and len(ck["history"]) == saved
    if moment == "mid-epoch":
        resume = (["--data", str(folder), "--workers", "0"] if trainer == "folder" else []) + [
            "-o", str(run), "--resume", "--stage", "1", "--threads", "1", "--no-progress"]
        rc = cli.main(["train", *resume])
        ck = torch.load(run / "stage1.pt", map_location="cpu", weights_only=True)
        assert rc == 0 and ck["epoch"] == 2 and ck["done"]


_SIGINT_PROBE = """
import json, signal, sys

import torch

from gfnet_edge.train.folder_data import make_loader
from gfnet_edge.train.folder_stages.sigint import SIGINT


class Probe(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):  # in the worker: SIGINT ignored, blocked
        blocked = hasattr(signal, "pthread_sigmask") and signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return torch.tensor([signal.getsignal(signal.SIGINT) is signal.SIG_IGN, blocked])


if __name__ == "__main__":
    torch.multiprocessing.set_start_method(sys.argv[1])
    print(json.dumps([b.tolist() for b in SIGINT.started(make_loader(Probe(), 1, range(2), 2, False, False))]))
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_the_trainers_dataloader_workers_ignore_sigint_themselves(tmp_path, start_method):
    """A DataLoader worker of the trainer, started as the trainer starts them (SIGINT blocked
    meanwhile), ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the training
    process handles it), forked or spawned, and does not keep it blocked (processes it starts
    inherit the ignored signal)."""
    probe = tmp_path / "probe.py"
    probe.write_text(_SIGINT_PROBE)
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # this checkout's gfnet_edge
    proc = subprocess.run([sys.executable, str(probe), start_method], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[[True, False]]] * 2, proc.stdout  # each batch: (ignored, blocked)


_SEMAPHORE_PROBE = """
import os, signal, sys
import multiprocessing
from multiprocessing import synchronize

from gfnet_edge.train.folder_stages.sigint import SIGINT

unlink = synchronize.sem_unlink


def unlink_then_ctrl_c(name):
    unlink(name)
    os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: before the tracker is told


synchronize.sem_unlink = unlink_then_ctrl_c
with SIGINT:
    lock = multiprocessing.get_context(sys.argv[1]).Lock()  # named, known to the resource tracker
    del lock  # its finalizer unlinks it, then unregisters it
    try:
        SIGINT.check()
    except KeyboardInterrupt:
        print("interrupted")
"""


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_ctrl_c_inside_a_semaphores_cleanup_stops_training_without_the_trackers_report(tmp_path, start_method):
    """A Ctrl-C that comes while multiprocessing cleans up a DataLoader queue's semaphore (its
    finalizer unlinks it, then unregisters it from the resource tracker) under spawn / forkserver
    stops training at the next check, and the cleanup runs whole: the resource tracker, which
    reports at exit every semaphore still registered, has nothing to say."""
    probe = tmp_path / "probe.py"
    probe.write_text(_SEMAPHORE_PROBE)
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # this checkout's gfnet_edge
    proc = subprocess.run([sys.executable, str(probe), start_method], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path})
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "interrupted\n", "")


def _ctrl_c_in_a_multiprocessing_finalizer() -> None:
    """SIGINT raised inside a multiprocessing finalizer (``util.Finalize``), as a Ctrl-C that
    comes while a DataLoader or a process pool closes one of its queues."""
    import signal
    from multiprocessing import util

    class Resource:
        pass

    resource = Resource()
    util.Finalize(resource, signal.raise_signal, (signal.SIGINT,))()


def test_a_ctrl_c_that_comes_after_the_last_check_still_ends_the_run(folder, tmp_path, monkeypatch, capsys):
    """A Ctrl-C inside multiprocessing's bookkeeping is recorded and raised at the next check; one
    that comes in the export's validation (as its DataLoader closes a queue), after which no
    check comes, ends the command all the same: exit 130 and the line that says how to continue,
    not a run that ends as if there had been no Ctrl-C."""
    import signal

    original = folder_stages.FolderTrainer.val_probs

    def val_probs(self, limit=0, amp=False):
        probs = original(self, limit, amp)
        if not amp:  # the export's validation
            _ctrl_c_in_a_multiprocessing_finalizer()
        return probs

    monkeypatch.setattr(folder_stages.FolderTrainer, "val_probs", val_probs)
    rc, err = _run_cli(["--data", folder, "-o", tmp_path / "run"], capsys)
    assert rc == 130 and len(err) == 1 and err[0].startswith("gfnet-edge: interrupted") and "--resume" in err[0], err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_ctrl_c_latch_works_where_multiprocessing_has_no_named_semaphores(monkeypatch):
    """On a platform without sem_open (no multiprocessing.synchronize) the latch still tells
    multiprocessing's finalizers from other code, and looks that up when entered, not in its
    signal handler."""
    import multiprocessing
    import multiprocessing.util

    from gfnet_edge.train.folder_stages import sigint

    monkeypatch.delattr(multiprocessing, "synchronize", raising=False)
    monkeypatch.setitem(sys.modules, "multiprocessing.synchronize", None)  # import raises ImportError
    sigint._bookkeeping_code.cache_clear()
    try:
        with sigint.SigintLatch():
            codes, _ = sigint._bookkeeping_code.__wrapped__()
            assert multiprocessing.util.Finalize.__call__.__code__ in codes
            assert sigint._bookkeeping_code.cache_info().currsize == 1
            assert not sigint._in_multiprocessing_bookkeeping(sys._getframe())
    finally:
        sigint._bookkeeping_code.cache_clear()


def _interrupted_writes(monkeypatch, name: str) -> None:
    """The first text written to a file named ``name`` (or to the temporary file of an atomic
    write of it, ``name.XXXX.tmp``) stops half-way with KeyboardInterrupt, as a Ctrl-C there would:
    half the text is in the file."""
    import io

    real_open, state = io.open, {"hit": False}

    class Half:
        def __init__(self, f) -> None:
            self._f = f

        def write(self, text):
            if state["hit"]:
                return self._f.write(text)
            state["hit"] = True
            self._f.write(text[:len(text) // 2])
            self._f.flush()
            raise KeyboardInterrupt

        def __getattr__(self, attr):
            return getattr(self._f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def opening(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        return Half(f) if "w" in mode and os.path.basename(path).startswith(name) and not state["hit"] else f

    monkeypatch.setattr(io, "open", opening)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a descriptor's file by /proc")
@pytest.mark.parametrize("trainer", ["folder", "demo"])
def test_a_ctrl_c_while_the_run_config_is_written_leaves_it_whole(folder, tmp_path, monkeypatch, capsys, trainer):
    """Ctrl-C while RUN/config.json is written leaves it whole or absent, never half-written: the
    --resume the interrupt line advises then continues the run."""
    run = tmp_path / "run"
    args = (["train", "--data", str(folder), "--backbone", "test_efficientnet", "--image-size", "64", "--patch-size",
             "32", "--epochs", "1", "--batch-size", "6", "--workers", "0"] if trainer == "folder" else
            ["train", "--tiny", "--threads", "1"]) + ["-o", str(run), "--no-progress"]
    _interrupted_writes(monkeypatch, "config.json")
    rc = cli.main(args)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and len(err) == 1 and "--resume" in err[0], err
    config = run / "config.json"
    assert not config.exists() or isinstance(json.loads(config.read_text()), dict)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")] if run.exists() else True
    rc = cli.main(args + ["--resume", "--stage", "1" if trainer == "folder" else "pretrain"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(config.read_text())["seed"] == 0


@pytest.mark.parametrize("stop_after", [1, 2])
def test_an_epoch_saved_but_not_logged_is_logged_on_resume(folder, tmp_path, monkeypatch, stop_after):
    """A run stopped after an epoch's checkpoint is written and before its record is logged (in
    the stage, or after its last epoch) logs that record when it is resumed: RUN/epochs.jsonl
    then holds each epoch's record once, as the stage checkpoint's history has it."""
    run, logged = tmp_path / "r", folder_stages.FolderTrainer.log

    def stopping(self, msg, **record):
        if record.get("epoch") == stop_after:
            raise KeyboardInterrupt
        logged(self, msg, **record)

    monkeypatch.setattr(folder_stages.FolderTrainer, "log", stopping)
    with pytest.raises(KeyboardInterrupt):
        train_folder(tiny_config(folder, epochs=(2, 1, 1)), run, stages=("stage1",))
    monkeypatch.setattr(folder_stages.FolderTrainer, "log", logged)
    saved = torch.load(run / "stage1.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == stop_after and saved["done"] == (stop_after == 2)
    jsonl = run / "epochs.jsonl"
    assert len(jsonl.read_text().splitlines() if jsonl.exists() else []) == stop_after - 1
    train_folder(tiny_config(folder, epochs=(2, 1, 1)), run, stages=("stage1",), resume=True)
    history = torch.load(run / "stage1.pt", map_location="cpu", weights_only=True)["history"]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert records == history and [(r["stage"], r["epoch"]) for r in records] == [("stage1", 1), ("stage1", 2)]
    assert history[:stop_after] == saved["history"]
    log = (run / "train.txt").read_text()
    assert [log.count(f"[stage1] epoch {e}/2 ") for e in (1, 2)] == [1, 1]
    assert f"[stage1] epoch {stop_after}/2 " in log.split("(from the checkpoint: the run stopped before logging it)")[0]


class _FullDisk:
    """A binary file on a disk that takes ``room`` bytes, then refuses writes as a full disk
    does (``OSError(ENOSPC)`` naming no file)."""

    def __init__(self, f, room: int = 1000):
        self.f, self.room = f, room

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_run_resumes(folder, tmp_path, monkeypatch,
                                                                                capsys):
    """Stage 1's second checkpoint meets a full disk: one line naming the run folder, exit 2, no
    half-written checkpoint (the first epoch's stays); with room again, --resume finishes it."""
    run = tmp_path / "run"
    args = ["train", "--data", str(folder), "--backbone", "test_efficientnet", "--image-size", "64",
            "--patch-size", "32", "--epochs", "2,0,0", "--batch-size", "6", "--workers", "0", "--threads", "1",
            "--stage", "1", "--no-progress", "-o", str(run)]
    from gfnet_edge.models import checkpoint

    recorder, opened = checkpoint._WriteRecorder, []

    def on_a_full_disk_the_second_time(f, name):  # the file torch.save writes each checkpoint through
        opened.append(Path(name).name)
        return recorder(_FullDisk(f) if len(opened) == 2 else f, name)

    monkeypatch.setattr(checkpoint, "_WriteRecorder", on_a_full_disk_the_second_time)
    rc = cli.main(args)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert [n.split(".tmp")[0].rsplit(".", 1)[0] for n in opened] == ["stage1.pt", "stage1.pt"], opened
    assert rc == 2 and err.count("error:") == 1, err
    assert err.endswith(f"gfnet-edge: error: {run}: cannot write the run's files (No space left on device)\n"), err
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(run / "stage1.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert cli.main(args + ["--resume"]) == 0
    assert torch.load(run / "stage1.pt", map_location="cpu", weights_only=True)["epoch"] == 2


def test_family_defaults_follow_released_variants():
    for timm_name, released in (("resnet50", "resnet50"), ("densenet121", "densenet121"), ("regnety_016", "regnety_1.6g"),
                                ("mobilenetv3_large_100", "mobilenetv3_large_100"), ("efficientnet_b2", "efficientnet_b2"),
                                ("efficientnet_b3", "efficientnet_b3")):
        v = VARIANTS[released]
        _, d = family_defaults(timm_name)
        assert (d.image_size, d.patch_size, d.steps) == (v.image_size, v.patch_sizes[0], v.steps), timm_name
        assert (d.classifier, d.policy_conv, d.policy_hidden, d.step0) == (v.classifier, v.policy_conv, v.policy_hidden, v.step0)
        assert d.glance_interpolation == v.glance_interpolation
    cfg = FolderTrainConfig(backbone="convnext_tiny").resolved()
    assert (cfg.steps, cfg.classifier, cfg.step0) == (3, "cascaded", "backbone")


def test_interrupted_run_resumes_to_the_same_weights(trained):
    run_a, _, interrupted, run_b, _ = trained
    assert interrupted["epoch"] == 1 and not interrupted["done"]
    for stage in ("stage1", "stage3"):
        a, b = _weights(run_a, stage), _weights(run_b, stage)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{stage} {k}")
    log = (run_b / "train.txt").read_text()
    assert "resuming after epoch 1" in log
    # the data scan comes before the log file exists, and is in it all the same
    assert "train: 24 images, 3 classes" in (run_a / "train.txt").read_text()
    history = [json.loads(line) for line in (run_a / "epochs.jsonl").read_text().splitlines()]
    assert [(h["stage"], h["epoch"]) for h in history] == [("stage1", 1), ("stage1", 2), ("stage2", 1), ("stage3", 1)]
    accs = [h[k] for h in history for k in h if k.endswith("_acc")]  # percentages, to 2 decimals as val's
    assert accs and all(round(a, 2) == a for a in accs), history


def test_a_resume_of_a_finished_and_exported_run_writes_nothing(trained, folder, weights, tmp_path, capsys):
    """--resume on a run whose stages have all finished and whose export is there leaves the
    exported checkpoint as it is (same bytes, so a bundle built from it still names it by its
    hash), returns the run's results and says so; --stage export writes it again."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".tar", ".json")}
    res = train_folder(tiny_config(folder, pretrained=weights), run, resume=True)
    assert res == json.loads((run / "results.json").read_text())
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".tar", ".json")} == before
    assert "nothing to do" in (run / "train.txt").read_text().splitlines()[-1]
    train_folder(tiny_config(folder, pretrained=weights), run, stages=(), resume=True)  # --stage export
    assert (run / "gfnet.pth.tar").read_bytes() != before["gfnet.pth.tar"]


def test_a_resume_of_a_finished_run_that_left_a_stage_out_writes_nothing(folder, tmp_path):
    """A run with 0 epochs for stages 2 and 3 (which leaves them out) has finished once stage 1
    has: its --resume leaves the exported checkpoint as it is, as for a run of every stage."""
    run = tmp_path / "run"
    train_folder(tiny_config(folder, epochs=(1, 0, 0)), run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".tar", ".json")}
    train_folder(tiny_config(folder, epochs=(1, 0, 0)), run, resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".tar", ".json")} == before
    assert "nothing to do" in (run / "train.txt").read_text().splitlines()[-1]


def test_a_resume_of_a_finished_run_whose_results_do_not_read_exports_again(folder, tmp_path):
    """A finished run whose RUN/results.json was emptied (a full disk, an editor): --resume
    measures and writes the export again, results.json with it, instead of stopping at it."""
    run = tmp_path / "run"
    first = train_folder(tiny_config(folder, epochs=(1, 0, 0)), run)
    (run / "results.json").write_text("")
    again = train_folder(tiny_config(folder, epochs=(1, 0, 0)), run, resume=True)
    assert again["anytime_accuracy"] == first["anytime_accuracy"]
    assert json.loads((run / "results.json").read_text())["anytime_accuracy"] == first["anytime_accuracy"]


def test_a_resume_after_a_stopped_export_exports_the_finished_stages(folder, tmp_path, monkeypatch):
    """An export of stage 2's weights (--stage export), then stage 3 trained and its export
    stopped before it was written: --resume writes the export of the finished run (the earlier
    export is not the run's), with the weights stage 3 saved."""
    from gfnet_edge.train import folder_cli

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    train_folder(tiny_config(folder, epochs=(1, 1, 1)), run, stages=("stage1", "stage2"))
    train_folder(tiny_config(folder, epochs=(1, 1, 1)), run, stages=(), resume=True)
    with monkeypatch.context() as m:
        m.setattr(folder_cli, "export", stopped)
        with pytest.raises(KeyboardInterrupt):
            train_folder(tiny_config(folder, epochs=(1, 1, 1)), run, stages=("stage3",), resume=True)
    train_folder(tiny_config(folder, epochs=(1, 1, 1)), run, resume=True)
    assert "nothing to do" not in (run / "train.txt").read_text()
    exported = load_checkpoint(run / "gfnet.pth.tar").state_dict()
    stage3 = _weights(run, "stage3")
    assert exported.keys() <= stage3.keys()
    assert all(torch.equal(v.float(), stage3[k].float()) for k, v in exported.items())


def test_a_static_baseline_added_to_an_exported_run_leaves_its_gfnet_checkpoint(trained, folder, weights, tmp_path):
    """--resume adding a static baseline (--static-epochs N) to a finished, exported run trains
    the baseline and adds it to results.json; the GFNet's checkpoint keeps its bytes (it was
    measured and written again)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    gfnet = (run / "gfnet.pth.tar").read_bytes()
    res = train_folder(tiny_config(folder, pretrained=weights, **{"static.epochs": 1}), run, resume=True)
    assert (run / "gfnet.pth.tar").read_bytes() == gfnet
    assert (run / "static.pth.tar").is_file() and res["static_accuracy"] == json.loads(
        (run / "results.json").read_text())["static_accuracy"]
    assert "added it to" in (run / "train.txt").read_text()


def test_checkpoint_metadata_matches_an_independent_evaluation(trained, folder):
    from gfnet_edge import evaluate as ev
    from gfnet_edge.data.images import load_images

    run_a, res, *_ = trained
    model = load_checkpoint(run_a / "gfnet.pth.tar")
    spec = model.spec
    assert (spec.image_size, spec.patch_size, spec.steps, spec.num_classes) == (64, 32, 4, 3)
    # the last stage's weights are the checkpoint's
    ref = _weights(run_a, "stage3")
    for k, v in model.model.net.state_dict().items():
        torch.testing.assert_close(v, ref[f"model.net.{k}"])
    frames, labels = load_images(folder / "val", 64, crop_pct=1.0)
    x = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) \
        / torch.tensor(spec.std).view(1, 3, 1, 1)
    probs = model.trace(x).probs.numpy()
    anytime = ev.anytime_accuracy(probs, labels)
    np.testing.assert_allclose(model.meta["anytime_classification"], anytime, atol=0.01)
    assert np.asarray(model.meta["dynamic_threshold"]).shape == (39, 4)
    curve = ev.budgeted_curve(probs, probs, labels, model.meta["flops"])
    np.testing.assert_allclose(model.meta["budgeted_batch_classification"][1], curve.accuracy, atol=1e-6)
    assert res["anytime_accuracy"] == model.meta["anytime_classification"]


def test_build_engine_takes_the_checkpoint_and_its_trace_equals_the_model(trained, tmp_path):
    from gfnet_edge.runtime import Runtime

    run_a, *_ = trained
    rc = cli.main(["build-engine", str(run_a / "gfnet.pth.tar"), "-o", str(tmp_path / "b"), "--precision", "fp32",
                   "--backend", "onnxruntime", "--quiet"])
    assert rc == 0
    model = load_checkpoint(run_a / "gfnet.pth.tar")
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64, 64)
    ref = model.trace(x)
    with Runtime(tmp_path / "b", backend="onnxruntime", precision="fp32") as rt:
        tr = rt.trace(x.numpy())
        assert rt.bundle.manifest["budgets"]  # thresholds from the checkpoint's dynamic_threshold
    np.testing.assert_allclose(tr.probs, ref.probs.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(tr.coords, ref.coords.numpy())


def test_build_engine_given_the_run_folder_or_a_stage_checkpoint_names_the_checkpoint_to_use(trained, tmp_path,
                                                                                              capsys):
    run_a, *_ = trained
    for src in (run_a, run_a / "stage3.pt"):
        rc = cli.main(["build-engine", str(src), "-o", str(tmp_path / "b"), "--precision", "fp32", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].endswith(f"use {run_a / 'gfnet.pth.tar'}"), (src, err)
        assert not (tmp_path / "b").exists()


def test_the_bundle_names_the_training_folders_classes(trained, folder, tmp_path, capsys):
    """The class folders' names travel checkpoint -> bundle: predict labels each image with its
    class's name, info lists them, and calibrate refuses a class folder whose classes differ."""
    import json

    from gfnet_edge.bundle import Bundle

    run_a, *_ = trained
    names = sorted(p.name for p in (folder / "train").iterdir())
    assert load_checkpoint(run_a / "gfnet.pth.tar").meta["classes"] == names
    b = tmp_path / "b"
    assert cli.main(["build-engine", str(run_a / "gfnet.pth.tar"), "-o", str(b), "--precision", "fp32",
                     "--backend", "onnxruntime", "--quiet"]) == 0
    assert Bundle.load(b).model.class_names == tuple(names)
    capsys.readouterr()
    assert cli.main(["predict", str(b), str(folder / "val" / "red"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["label"] == names[r["class"]] for r in rows)
    # a folder of the model's class folders is scored too (stderr), a class folder alone is not
    assert "accuracy" not in capsys.readouterr().err
    assert cli.main(["predict", str(b), str(folder / "val"), "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    right = sum(r["label"] == Path(r["image"]).relative_to(folder / "val").parts[0] for r in rows)
    assert len(rows) == sum(1 for _ in (folder / "val").rglob("*.png"))
    assert err == (f"accuracy: {100 * right / len(rows):.2f} % ({right} of {len(rows)} images in the class folders "
                   f"of {folder / 'val'}, labelled by their folder)\n"), err
    assert cli.main(["predict", str(b), str(folder / "val" / "red" / "0.png")]) == 0
    row = json.dumps(rows[0]["label"])[1:-1]
    assert f"class {rows[0]['class']} '{row}' (" in capsys.readouterr().out
    assert cli.main(["info", str(b)]) == 0
    assert f"class names      {', '.join(names)}" in capsys.readouterr().out
    # a labelled folder with other class folders: refused before any image is read
    other = make_folder(tmp_path / "other", n_train=1, n_val=2, classes=("blue", "red"))
    (other / "val" / "violet").mkdir()
    (other / "val" / "violet" / "0.png").write_bytes((other / "val" / "red" / "0.png").read_bytes())
    rc = cli.main(["calibrate", str(b), "--data", str(other / "val"), "-o", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing green" in err and "not the model's: violet" in err and not (tmp_path / "r").exists()
    # the training ROOT instead of one of its splits: the line names the split to pass
    rc = cli.main(["calibrate", str(b), "--data", str(folder), "-o", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not the model's: train, val" in err[0], err
    assert f"train, val hold the model's class folders: pass one of them, e.g. {folder / 'val'})" in err[0], err
    assert not (tmp_path / "r").exists()
    # build-engine --calib-data ROOT likewise, naming the split once, before any export
    rc = cli.main(["build-engine", str(run_a / "gfnet.pth.tar"), "-o", str(tmp_path / "b8"), "--backend",
                   "onnxruntime", "--calib-data", str(folder), "--num-calib", "16", "--num-eval", "32", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].count(str(folder / "val")) == 1 and err[0].count("/val") == 1, err
    assert "--num-eval 0" in err[0] and not (tmp_path / "b8").exists()
    # without names in the bundle, the count of class folders must still match
    Bundle.load(b).update_manifest(lambda m: m["model"].update(class_names=None))
    (other / "val" / "violet" / "0.png").unlink()
    (other / "val" / "violet").rmdir()
    rc = cli.main(["calibrate", str(b), "--data", str(other / "val"), "-o", str(tmp_path / "r"), "-q"])
    assert rc == 2 and "2 class folders for a model with 3 classes" in capsys.readouterr().err


def test_calibrate_static_given_the_gfnet_checkpoint_names_the_runs_static_baseline(trained, folder, tmp_path,
                                                                                    capsys):
    """``calibrate --static RUN/gfnet.pth.tar`` (the GFNet, not its baseline): one line, the path
    once, naming RUN/static.pth.tar where the run has one, else the command that trains it, before
    the calibration images are read."""
    from gfnet_edge.train.static import save_static

    run_a, *_ = trained
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    b = tmp_path / "b"
    assert cli.main(["build-engine", str(run / "gfnet.pth.tar"), "-o", str(b), "--precision", "fp32", "-q"]) == 0
    capsys.readouterr()
    args = ["calibrate", str(b), "--data", str(folder / "val"), "-o", str(tmp_path / "r"), "-q", "--static",
            str(run / "gfnet.pth.tar")]
    expected = (f"gfnet-edge: error: --static {run / 'gfnet.pth.tar'}: a GFNet checkpoint, not a static baseline: "
                f"pass a run's static baseline RUN/static.pth.tar ({run} has none: `gfnet-edge train -o {run} "
                "--resume --stage static --static-epochs N` trains one)")
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]  # before the images are read (or warned of)
    save_static(run / "static.pth.tar", timm.create_model("test_efficientnet", num_classes=3), "test_efficientnet",
                {}, 3, image_size=64)
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gfnet-edge: error: --static {run / 'gfnet.pth.tar'}: a GFNet checkpoint, not a static baseline: pass its "
        f"static baseline {run / 'static.pth.tar'}")
    assert not (tmp_path / "r").exists()


def test_gru_family_with_static_baseline(folder, tmp_path):
    from gfnet_edge.train.static import load_static

    cfg = tiny_config(folder, backbone="test_resnet", epochs=(1, 1, 1), fc_hidden=32, policy_hidden=32, steps=3)
    cfg.static.epochs = 1
    res = train_folder(cfg, tmp_path / "r")
    model = load_checkpoint(tmp_path / "r" / "gfnet.pth.tar")
    assert (model.spec.classifier, model.spec.step0, model.spec.policy_conv) == ("gru", "classifier", False)
    net, meta = load_static(tmp_path / "r" / "static.pth.tar")
    assert meta["backbone"] == "test_resnet" and meta["num_classes"] == 3
    # the pre-processing it was validated with, which calibrate --static checks against the bundle's
    assert (meta["crop_pct"], meta["dataset_interpolation"]) == (1.0, model.spec.dataset_interpolation) == \
        (model.spec.crop_pct, "bilinear")
    assert res["static_accuracy"] == meta["val_accuracy"]
    # the log's last lines name every file the export wrote, and the command that takes the checkpoint
    run = tmp_path / "r"
    wrote = [ln for ln in (run / "train.txt").read_text().splitlines() if " wrote " in ln][-1]
    files = [run / "gfnet.pth.tar", run / "results.json", run / "static.pth.tar"]
    assert f"wrote {', '.join(map(str, files))} (" in wrote and all(f.is_file() for f in files)
    # (the fixture's val split, 12 images, is under the 16 INT8 calibration needs; its train split has 24)
    assert wrote.endswith(f"next: gfnet-edge build-engine {run / 'gfnet.pth.tar'} -o BUNDLE --calib-data "
                          f"{folder / 'train'}")


def _logged_build_command(run: Path, bundle: Path) -> list:
    """The arguments of the ``next: gfnet-edge build-engine ...`` command the run's log ends
    with, its ``-o BUNDLE`` placeholder replaced by ``bundle`` (what follows a ``;`` is a note)."""
    line = [ln for ln in (run / "train.txt").read_text().splitlines() if " next: " in ln][-1]
    argv = line.split(" next: ", 1)[1].split(";")[0].split()
    assert argv[:2] == ["gfnet-edge", "build-engine"] and argv[argv.index("-o") + 1] == "BUNDLE"
    argv[argv.index("-o") + 1] = str(bundle)
    return argv[1:] + ["--quiet"]


@pytest.mark.parametrize("n_train, n_val, calib", [(6, 6, "val"), (6, 2, "train"), (3, 2, None)])
def test_the_logged_build_command_builds_a_bundle_from_a_small_image_folder(tmp_path, n_train, n_val, calib):
    """The command the log suggests builds a bundle from the run's own images: INT8 calibrated on
    the val split when it has the 16 images calibration needs, else on the train split when that
    has them, else an fp32 bundle."""
    root = make_folder(tmp_path / "ds", n_train=n_train, n_val=n_val)
    run = tmp_path / "r"
    train_folder(tiny_config(root, epochs=(1, 0, 0)), run)
    argv = _logged_build_command(run, tmp_path / "b")
    assert argv[1] == str(run / "gfnet.pth.tar")
    if calib:
        assert argv[argv.index("--calib-data") + 1] == str(root / calib)
    else:
        assert "--calib-data" not in argv and argv[argv.index("--precision") + 1] == "fp32"
    assert cli.main(argv) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert ("int8-cpu" in manifest["graphs"]) == bool(calib)


def test_the_logged_build_command_leaves_out_the_files_training_skipped(tmp_path):
    """A val split with a file training could not read: the suggested build reads the same images
    (build-engine stops at an unreadable file unless told to leave such files out)."""
    root = make_folder(tmp_path / "ds", n_train=2, n_val=6)
    (root / "val" / "red" / "broken.png").write_bytes(b"not an image")
    run = tmp_path / "r"
    train_folder(tiny_config(root, epochs=(1, 0, 0)), run)
    argv = _logged_build_command(run, tmp_path / "b")
    assert argv[argv.index("--calib-data") + 1] == str(root / "val")
    assert cli.main(argv) == 0
    assert "int8-cpu" in json.loads((tmp_path / "b" / "manifest.json").read_text())["graphs"]


def test_the_logged_budgeted_accuracy_is_that_of_the_bundles_macs_budgets(trained, tmp_path):
    """The log's budgeted figures are those of the thresholds build-engine makes the bundle's
    macs-low / macs-mid / macs-high budgets (rows of the checkpoint's 39 x T dynamic_threshold)."""
    run = trained[0]
    assert cli.main(["build-engine", str(run / "gfnet.pth.tar"), "-o", str(tmp_path / "b"), "--precision", "fp32",
                     "--quiet"]) == 0
    budgets = json.loads((tmp_path / "b" / "manifest.json").read_text())["budgets"]
    ck = torch.load(run / "gfnet.pth.tar", map_location="cpu", weights_only=True)
    rows = np.asarray(ck["dynamic_threshold"], dtype=np.float32)
    costs, accs = json.loads((run / "results.json").read_text())["budgeted_batch_classification"]
    line = [ln for ln in (run / "train.txt").read_text().splitlines() if "val budgeted" in ln][-1]
    for name in ("macs-low", "macs-mid", "macs-high"):
        row = [i for i in range(len(rows)) if np.array_equal(rows[i], np.float32(budgets[name]["thresholds"]))][0]
        assert f"{name} {accs[row]:.1f}% @ {costs[row] / 1e6:.1f}M" in line


def test_predict_says_why_a_folder_of_other_class_folders_is_not_scored(trained, folder, tmp_path, capsys):
    """A folder whose class folders share names with the model's classes but are not all of them
    (a class missing, another spelling) is classified without an accuracy: a warning says why,
    once however often the folder is given; a folder of unrelated subfolders gets none."""
    b = tmp_path / "b"
    assert cli.main(["build-engine", str(trained[0] / "gfnet.pth.tar"), "-o", str(b), "--precision", "fp32",
                     "--quiet"]) == 0
    test = tmp_path / "test"
    shutil.copytree(folder / "val", test)
    (test / "red").rename(test / "Red")
    photos = tmp_path / "photos"
    shutil.copytree(folder / "val" / "red", photos / "2024")
    capsys.readouterr()
    assert cli.main(["predict", str(b), str(test), str(photos), str(test) + "/"]) == 0  # test given twice
    out, err = capsys.readouterr()
    assert out.count("\n") == 12 + 4 and "accuracy" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(test) in lines[0] and "missing red" in lines[0] and "Red" in lines[0], err
    assert "not scored" in lines[0] and str(photos) not in lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m gfnet_edge.cli ARGS`` (gloo on the CPU)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           "-m", "gfnet_edge.cli", *map(str, args)],
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)


def test_torchrun_two_processes_match_one(folder, weights, tmp_path):
    # GroupNorm backbone: no batch statistics, so 2 x 3 images per step equal 1 x 6 exactly.
    args = ["train", "--data", str(folder), "--backbone", "test_efficientnet_gn", "--image-size", "64",
            "--patch-size", "32", "--epochs", "2,0,0", "--batch-size", "6", "--workers", "0", "--threads", "1",
            "--stage", "1", "--no-progress", "--set", "stage1.lr=0.003"]
    assert cli.main(args + ["-o", str(tmp_path / "one")]) == 0

    def torchrun(out):
        return _torchrun([*args, "-o", out])

    proc = torchrun(tmp_path / "two")
    if proc.returncode != 0 and "SIGABRT" in proc.stderr:
        # a gloo worker aborting as the processes exit has been seen once on a loaded 2-core
        # machine; one more run tells it from a real failure, which fails both
        proc = torchrun(tmp_path / "two-again")
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        (tmp_path / "two-again").rename(tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout
    assert proc.stdout.count("[stage1] epoch") == 2  # rank 0 logs, rank 1 does not
    one, two = _weights(tmp_path / "one", "stage1"), _weights(tmp_path / "two", "stage1")
    assert len(torch.load(tmp_path / "one" / "stage1.pt", weights_only=True)["history"]) == 2
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=k)
    # and training did move the weights (the comparison is not between two untouched models)
    torch.manual_seed(0)
    fresh = timm.create_model("test_efficientnet_gn", num_classes=3).state_dict()
    moved = max((one[f"model.net.{k}"] - v).abs().max().item() for k, v in fresh.items() if v.is_floating_point())
    assert moved > 1e-3


@pytest.mark.parametrize("bad, message", [
    (["--batch-size", "0"], "gfnet-edge: error: gfnet-edge train: argument --batch-size: must be in [1, "),
    (["--data", "{missing}"], "gfnet-edge: error: {missing}: no such folder"),
])
def test_torchrun_reports_a_bad_option_or_data_folder_once(folder, tmp_path, bad, message):
    """Every rank meets a bad option or data folder alike, and rank 0 alone reports it (exit 2;
    rank 1 exits 2 too, or by torchrun's SIGTERM when rank 0 ends first)."""
    import re

    missing = tmp_path / "missing"
    bad = [b.format(missing=missing) for b in bad]
    proc = _torchrun(["train", "--data", folder, "-o", tmp_path / "run", "--backbone", "test_efficientnet",
                      "--workers", "0", "--threads", "1", "--no-progress", *bad])
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "gfnet-edge: error:" in line]
    assert len(lines) == 1 and lines[0].startswith(message.format(missing=missing)), proc.stderr[-3000:]
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+) \(pid", proc.stderr, re.M)  # torchrun's report
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ bad input
def _run_cli(args, capsys):
    rc = cli.main(["train", "--backbone", "test_efficientnet", "--image-size", "64", "--patch-size", "32", "--epochs",
                   "1", "--batch-size", "6", "--workers", "0", "--no-progress", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("breakage, message", [
    ("no_val", "no val/ folder"),
    ("one_class", "needs at least 2 class folders"),
    ("empty_class", "no images"),
    ("class_mismatch", "train and val have different classes"),
    # the same name typed on macOS (decomposed, NFD) and elsewhere (composed, NFC)
    ("unicode_forms", "'Gro\\u0308\\xdfe', 'Gr\\xf6\\xdfe'): rename one"),
    ("all_unreadable", "none of its 4 images is readable"),
])
def test_bad_folders_exit_with_one_line(tmp_path, capsys, breakage, message):
    import shutil

    root = make_folder(tmp_path / "ds", n_train=6, n_val=4)
    if breakage == "no_val":
        shutil.rmtree(root / "val")
    elif breakage == "one_class":
        for c in ("green", "red"):
            shutil.rmtree(root / "train" / c)
            shutil.rmtree(root / "val" / c)
    elif breakage == "empty_class":
        for f in (root / "train" / "red").iterdir():
            f.unlink()
    elif breakage == "class_mismatch":
        (root / "val" / "red").rename(root / "val" / "yellow")
    elif breakage == "unicode_forms":
        import unicodedata

        (root / "train" / "red").rename(root / "train" / unicodedata.normalize("NFD", "Größe"))
        (root / "val" / "red").rename(root / "val" / unicodedata.normalize("NFC", "Größe"))
    elif breakage == "all_unreadable":
        for f in (root / "val" / "red").iterdir():
            f.write_bytes(b"not an image")
    rc, err = _run_cli(["--data", root, "-o", tmp_path / "run"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("gfnet-edge: error:") and message in err[0], err
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_data_folder_without_its_splits_names_what_it_holds(tmp_path, capsys):
    """--data given one split (ROOT/train, ROOT/val) names ROOT; a folder without train/ or val/
    lists the folders it holds (a validation split named otherwise, or class folders)."""
    root = make_folder(tmp_path / "ds", n_train=6, n_val=4)
    for split in ("train", "val"):
        rc, err = _run_cli(["--data", root / split, "-o", tmp_path / "run"], capsys)
        assert rc == 2 and len(err) == 1, err
        assert err[0].endswith(f"no train/ folder ({LAYOUT}); it is one split of the image folder: pass --data {root}")
    (root / "val").rename(root / "valid")
    rc, err = _run_cli(["--data", root, "-o", tmp_path / "run"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].endswith(f"no val/ folder ({LAYOUT}); the folders in it: train, valid")
    rc, err = _run_cli(["--data", root / "train", "-o", tmp_path / "run"], capsys)  # class folders, no splits
    assert rc == 2 and len(err) == 1 and err[0].endswith("; the folders in it: blue, green, red"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("breakage", ["no_val", "class_mismatch", "val_class_without_images"])
def test_a_broken_val_split_is_reported_before_any_train_image_is_decoded(tmp_path, capsys, monkeypatch, breakage):
    """Both splits are listed before images are decoded: a missing val/, class folders that differ
    or an empty val class end the command before it reads the (possibly large) train split."""
    from gfnet_edge.train import folder_data

    root = make_folder(tmp_path / "ds", n_train=6, n_val=2)
    if breakage == "no_val":
        shutil.rmtree(root / "val")
    elif breakage == "class_mismatch":
        (root / "val" / "red").rename(root / "val" / "rouge")
    else:
        for f in (root / "val" / "red").iterdir():
            f.unlink()
    decoded = []
    monkeypatch.setattr(folder_data, "_readable", lambda f: decoded.append(f) or True)
    rc, err = _run_cli(["--data", root, "-o", tmp_path / "run"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("gfnet-edge: error:"), err
    assert decoded == [] and not (tmp_path / "run").exists()


def test_reading_the_images_shows_progress_unless_told_not_to(tmp_path, capsys):
    """Decoding every image before training (minutes on a large folder) has a progress bar per
    split, as the epochs have; --no-progress leaves it out."""
    root = make_folder(tmp_path / "ds", n_train=4, n_val=2)
    args = ["train", "--data", str(root), "-o", str(tmp_path / "run"), "--backbone", "test_efficientnet",
            "--batch-size", "60", "--workers", "0"]  # a batch larger than the split: ends after the scan
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"reading {root / 'train'}:" in err and "/12 [" in err, err
    assert f"reading {root / 'val'}:" in err and "/6 [" in err, err
    assert "fewer than one batch" in err.strip().splitlines()[-1]
    assert cli.main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"reading {root}" not in err[0] and "fewer than one batch" in err[0], err


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "ds", n_train=5, n_val=2)
    (root / "train" / "red" / "0.png").write_bytes(b"\x89PNG truncated")
    (root / "train" / "blue" / "3.png").write_bytes(b"")
    split = scan_split(root, "train")
    assert len(split) == 13 and sorted(Path(f).name for f in split.skipped) == ["0.png", "3.png"]
    assert not set(split.skipped) & {p for p, _ in split.samples}


def test_a_file_name_that_is_not_utf8_is_logged_with_escapes(tmp_path, capsys):
    """An unreadable file whose name is not UTF-8 (Latin-1 from an old archive) is skipped and
    named in the log as its bytes escaped; the run trains."""
    root = make_folder(tmp_path / "ds", n_train=6, n_val=2)
    with open(os.fsencode(root / "train" / "red") + b"/caf\xe9.png", "wb") as f:
        f.write(b"not an image")
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", root, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    first = (run / "train.txt").read_text(encoding="utf-8").splitlines()[0]
    assert first.endswith(f"{root / 'train'}: 18 images, 3 classes; skipped 1 unreadable (caf\\xe9.png)"), first
    assert (run / "stage1.pt").is_file()


def test_linked_folders_are_listed_once_and_under_their_own_class(tmp_path):
    """Links to folders are followed (a class folder may gather images kept elsewhere), but a link
    back up to the split (a loop) or to another class's folder adds nothing: every image is listed
    once, under the class whose folder holds it."""
    root = make_folder(tmp_path / "ds", n_train=3, n_val=1)
    kept = make_folder(tmp_path / "kept", n_train=2, n_val=1, classes=("red",), seed=1) / "train" / "red"
    (root / "train" / "red" / "kept").symlink_to(kept)
    (root / "train" / "red" / "loop").symlink_to(root / "train")
    (root / "train" / "blue" / "also_green").symlink_to(root / "train" / "green")
    split = scan_split(root, "train")
    got = {c: sorted(os.path.realpath(f) for f, lab in split.samples if lab == k) for k, c in enumerate(split.classes)}
    want = {c: sorted(os.path.realpath(f) for f in (root / "train" / c).iterdir() if f.is_file())
            for c in ("blue", "green", "red")}
    want["red"] = sorted(want["red"] + [os.path.realpath(f) for f in kept.iterdir()])
    assert got == want and len(split) == 11


def test_bad_options_and_weights(tmp_path, capsys, folder, weights):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), other)
    hub = tmp_path / "test_efficientnet.hub"
    hub.mkdir()
    (hub / "config.json").write_text("{}")
    (hub / "model.safetensors").write_bytes(b"")
    run = ["--data", folder, "-o", tmp_path / "r"]
    for args, message in (
        (["--data", folder, "-o", tmp_path / "r", "--pretrained", tmp_path / "missing.pth"], "weights file not found"),
        (["--data", folder, "-o", tmp_path / "r", "--pretrained", bad], "not a readable torch weights file"),
        (["--data", folder, "-o", tmp_path / "r", "--pretrained", hub],  # a model folder as the hub gives it
         f"{hub}: a folder, not a weights file: pass the file (in it: model.safetensors)"),
        (["--data", folder, "-o", tmp_path / "r", "--pretrained", other], "does not fit this backbone"),
        (["--data", folder], "needs -o RUN"),
        (["--data", folder, "-o", tmp_path / "r", "--epochs", "1,2"], "--epochs takes"),
        # an empty value (a shell variable that is not set) is not the default schedule, nor the demo task
        (["--data", folder, "-o", tmp_path / "r", "--epochs", ""], "--epochs takes N or N1,N2,N3 (integers), got ''"),
        (["--data", "", "-o", tmp_path / "r"], "--data is empty: give the image folder ROOT"),
        (["--data", folder, "-o", tmp_path / "r", "--stage", "pretrain"], "demo stage"),
        (["--data", tmp_path / "nowhere", "-o", tmp_path / "r"], "no such folder"),
        (["--data", folder, "-o", tmp_path / "r", "--tiny"], "--tiny applies to the demo trainer"),
        (["--data", folder, "-o", tmp_path / "r", "--assets", tmp_path / "a"], "--assets applies to the demo"),
        (["--data", folder, "-o", tmp_path / "r", "--stage", "3"], "--stage 3 needs the weights of an earlier stage"),
        (["--data", folder, "-o", tmp_path / "r", "--stage", "2"], "(stage1) in"),
        (["--data", folder, "-o", tmp_path / "r", "--stage", "export"], "--stage export needs"),
        (["--data", folder, "-o", tmp_path / "r", "--steps", "1"], "--steps must be at least 2"),
        (["--data", folder, "-o", tmp_path / "r", "--set", "crop_pct=0"], "crop_pct must be in (0, 1]"),
        (["--data", folder, "-o", tmp_path / "r", "--backbone", "test_vit"], "does not work as a GFNet encoder"),
        *(([*run, *opts], message) for opts, message in (
            (["--epochs", "0"], "stage 1 needs at least 1 epoch"),
            (["--epochs", "0,1,1"], "stage 1 needs at least 1 epoch"),
            (["--set", "stage2.epochs=-1"], "stage2.epochs must be 0 or more"),
            (["--set", 'stage1.lr="fast"'], "stage1.lr takes a number"),
            (["--set", "hflip=1"], "hflip takes true/false"),
            (["--set", "classifier=3"], "classifier takes a string"),
            # numbers of the right type but out of range: refused before the run folder is written
            (["--set", "stage1.lr=-1"], "stage1.lr must be in (0, inf), got -1"),
            (["--set", "stage2.lr=NaN"], "stage2.lr must be in (0, inf), got nan"),
            (["--set", "stage1.iters=-1"], "stage1.iters must be in [0, inf), got -1"),
            (["--set", "weight_decay=-0.1"], "weight_decay must be in [0, inf), got -0.1"),
            (["--set", "workers=-1"], "workers must be in [0, inf), got -1"),
            (["--set", "action_std=0"], "action_std must be in (0, inf), got 0"),
            (["--set", "gamma=1.5"], "gamma must be in [0, 1], got 1.5"),
            (["--set", "dsn_ratio=NaN"], "dsn_ratio must be in [0, inf), got nan"),
            (["--set", "eval_max=-1"], "eval_max must be in [0, inf), got -1"),
            (["--set", 'classifier="cascaded"', "--steps", "7"],  # a setting, not a backbone that does not fit
             "--backbone test_efficientnet: cascaded classifiers support at most 5 steps, got 7"))),
    ):
        rc, err = _run_cli(args, capsys)
        assert rc == 2 and len(err) == 1 and message in err[0], (args, err)
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["static baseline", "GFNet checkpoint"])
def test_weights_built_with_other_backbone_kwargs_name_them(tmp_path, capsys, folder, kind):
    """A static baseline, or a GFNet checkpoint (the shipped demo model: a quarter-width
    resnet18), whose backbone was built with other ``backbone_kwargs`` than the run's does not
    fit: the one line names the --set that builds the backbone it fits, which then trains."""
    from gfnet_edge.demo import DEMO_CHECKPOINT
    from gfnet_edge.train.static import save_static

    if kind == "static baseline":
        backbone, kwargs = "test_resnet", {"stem_width": 8}
        weights = save_static(tmp_path / "static.pth.tar", timm.create_model(backbone, num_classes=3, **kwargs),
                              backbone, kwargs, 3, image_size=64)
    else:
        backbone, kwargs, weights = "resnet18", {"channels": [16, 32, 64, 128], "stem_width": 16}, DEMO_CHECKPOINT
    args = ["--data", folder, "--backbone", backbone, "--pretrained", weights, "--stage", "1"]
    rc, err = _run_cli([*args, "-o", tmp_path / "r"], capsys)
    assert rc == 2 and len(err) == 1 and "does not fit this backbone" in err[0], err
    want = f"it is a {kind} built with --set 'backbone_kwargs={json.dumps(kwargs)}' (this run: {{}})"
    assert err[0].endswith(want), err
    assert not (tmp_path / "r").exists()
    rc, err = _run_cli([*args, "-o", tmp_path / "r", "--set", f"backbone_kwargs={json.dumps(kwargs)}"], capsys)
    assert rc == 0, err


def test_help_marks_the_options_the_image_folder_trainer_refuses(tmp_path, capsys, folder):
    """Every option (or choice) that ``--data`` refuses is marked "demo trainer only" in --help."""
    import re

    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    entries = {m.group(1): " ".join(m.group(2).split())
               for m in re.finditer(r"^  (--[\w-]+)([^\n]*\n(?:(?!  -).*\n)*)", text, re.M)}
    for flag, opts in (("--tiny", ["--tiny"]), ("--assets", ["--assets", tmp_path / "a"]),
                       ("--stage", ["--stage", "pretrain"])):
        rc, err = _run_cli(["--data", folder, "-o", tmp_path / "r", *opts], capsys)
        assert rc == 2 and len(err) == 1, (opts, err)
        assert "demo trainer only" in entries[flag], (flag, entries[flag])
    assert "pretrain (demo trainer only)" in entries["--stage"]


def test_every_seed_the_option_takes_trains_and_others_are_refused(tmp_path, capsys, folder):
    """--seed takes 0 .. 2**32 - 1, and a run trains with any of them (a date such as 20240101 too:
    the per-image augmentation seeds derived from it stay within torch's 64 bits); a seed outside,
    given by --seed or --set, is one line and writes nothing."""
    for seed in (20240101, 2**32 - 1):
        rc, err = _run_cli(["--data", folder, "-o", tmp_path / str(seed), "--stage", "1", "--seed", seed], capsys)
        assert rc == 0, err
        assert json.loads((tmp_path / str(seed) / "config.json").read_text())["seed"] == seed
        assert torch.load(tmp_path / str(seed) / "stage1.pt", weights_only=True)["done"]
    for opts, message in ((["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
                          (["--seed", 2**32], "argument --seed: must be in [0, 4294967295], got 4294967296"),
                          (["--set", "seed=-1"], "seed must be in [0, 4294967295], got -1")):
        rc, err = _run_cli(["--data", folder, "-o", tmp_path / "r", *opts], capsys)
        assert rc == 2 and len(err) == 1 and message in err[0], (opts, err)
        assert not (tmp_path / "r").exists()


def _tree(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_stage_checkpoint_that_does_not_read_or_fit_is_named_on_resume(tmp_path, capsys, folder):
    """--resume with a RUN/stage1.pt that is truncated, not a stage checkpoint, one of a run of
    another backbone, or one whose optimiser trained other parameters: one line naming the file
    and what is wrong with it (exit 2), and the file is left as it is."""
    runs = {}
    for name, opts in (("run", ["--epochs", "2"]), ("resnet", ["--backbone", "test_resnet"]),
                       ("frozen_glance", ["--set", "train_glance=false"])):
        rc, err = _run_cli(["--data", folder, "-o", tmp_path / name, "--stage", "1", *opts], capsys)
        assert rc == 0, err
        runs[name] = (tmp_path / name / "stage1.pt").read_bytes()
    unfinished = torch.load(tmp_path / "frozen_glance" / "stage1.pt", weights_only=True)
    unfinished.update(done=False, epoch=1)  # resumed: its optimiser state is loaded
    torch.save(unfinished, tmp_path / "unfinished.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    run, path = tmp_path / "run", tmp_path / "run" / "stage1.pt"
    for content, message in (
        (runs["run"][:3000], "not a readable torch stage checkpoint file (truncated or corrupt?)"),
        ((tmp_path / "foreign.pt").read_bytes(), "not a stage checkpoint of gfnet-edge train"),
        (runs["resnet"], "its gfnet weights do not fit this run's model (a checkpoint of another run?): Missing key"),
        ((tmp_path / "unfinished.pt").read_bytes(), "its optimiser state does not fit this run's stage1"),
    ):
        path.write_bytes(content)
        rc, err = _run_cli(["--data", folder, "-o", run, "--epochs", "2", "--resume"], capsys)
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"gfnet-edge: error: {path}: ") and message in err[0], err
        assert path.read_bytes() == content and not (run / "stage2.pt").exists()


def test_a_data_index_that_does_not_read_is_named_on_resume_and_the_data_listed_again_without_it(
        tmp_path, capsys, folder):
    """A resumed run reads its list of images from RUN/data_index.json: one that is not JSON, or
    not such a list, is named in one line (exit 2); moved away, the data folder is listed again."""
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    index = run / "data_index.json"
    for content in ("{", '{"train": {}}', "[1]"):
        index.write_text(content)
        rc, err = _run_cli(["--data", folder, "-o", run, "--resume", "--stage", "2"], capsys)
        assert rc == 2 and len(err) == 1 and err[0].startswith(
            f"gfnet-edge: error: {index}: not a data index of gfnet-edge train (") and "move it away" in err[0], err
        assert not (run / "stage2.pt").exists()
    index.unlink()
    rc, err = _run_cli(["--data", folder, "-o", run, "--resume", "--stage", "2"], capsys)
    assert rc == 0 and (run / "stage2.pt").is_file(), err
    assert (run / "train.txt").read_text().count(f"{folder / 'train'}: 24 images, 3 classes") == 2  # listed again


def test_images_deleted_since_the_run_listed_them_are_named_on_resume(tmp_path, capsys):
    """The images a run listed (RUN/data_index.json) are checked on --resume: one deleted since is
    named in one line with the way out, before any training; with the index moved away the run
    lists the folder again and goes on with the images there are."""
    root = make_folder(tmp_path / "ds", n_train=6, n_val=2)
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", root, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    gone = sorted((root / "train").rglob("*.png"))[0]
    gone.unlink()
    rc, err = _run_cli(["--data", root, "-o", run, "--resume", "--stage", "2"], capsys)
    assert rc == 2 and len(err) == 1 and "1 image(s) listed in" in err[0] and f"(first: {gone})" in err[0], err
    assert "move data_index.json away" in err[0] and not (run / "stage2.pt").exists()
    (run / "data_index.json").unlink()
    rc, err = _run_cli(["--data", root, "-o", run, "--resume", "--stage", "2"], capsys)
    assert rc == 0 and (run / "stage2.pt").is_file(), err


def test_the_run_folder_is_outside_the_data_and_holds_nothing_of_the_users(tmp_path, capsys):
    """-o inside the data folder, or a folder of the user's without a run in it, is refused with one
    line and left as it was; a folder holding only what a first try wrote before its config (a log,
    a data index of other images) starts a new run that scans the given data."""
    root = make_folder(tmp_path / "ds", n_train=6, n_val=2)
    before = _tree(root)
    for out in (root, root / "runs" / "r", root / "train" / "red"):
        rc, err = _run_cli(["--data", root, "-o", out], capsys)
        assert rc == 2 and len(err) == 1 and "is inside the data folder" in err[0], (out, err)
        assert _tree(root) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("my results")
    (mine / "notes.txt").write_text("my notes")
    rc, err = _run_cli(["--data", root, "-o", mine], capsys)
    assert rc == 2 and len(err) == 1 and "holds notes.txt, results.json and no gfnet-edge run" in err[0], err
    assert _tree(mine) == {"notes.txt": b"my notes", "results.json": b"my results"}
    tried = tmp_path / "tried"
    tried.mkdir()
    (tried / "train.txt").write_text("a first try\n")
    other = make_folder(tmp_path / "other", n_train=6, n_val=2, classes=("blue", "green"))
    stale = {k: {"root": str(other / k), "classes": ["blue", "green"],
                 "samples": [[str(f), 0] for f in sorted((other / k / "blue").iterdir())], "skipped": []}
             for k in ("train", "val")}
    (tried / "data_index.json").write_text(json.dumps(stale))
    rc, err = _run_cli(["--data", root, "-o", tried, "--stage", "1"], capsys)
    assert rc == 0, err
    index = json.loads((tried / "data_index.json").read_text())
    assert index["train"]["classes"] == ["blue", "green", "red"]
    assert sorted(p for p, _ in index["train"]["samples"]) == sorted(str(f) for f in (root / "train").rglob("*.png"))
    assert json.loads((tried / "config.json").read_text())["classes"] == ["blue", "green", "red"]


def test_a_run_folder_takes_one_training_at_a_time_and_resumes_without_its_pretrained_file(
        folder, weights, tmp_path):
    """A second training into a run folder that one is writing is refused (nothing of it
    written); a resumed run takes its weights from its stage checkpoints, so the pretrained file
    it started from may be gone."""
    import shutil

    from gfnet_edge.errors import InputError
    from gfnet_edge.train.folder_cli import _RunLock

    run = tmp_path / "run"
    held = _RunLock(run)
    try:
        with pytest.raises(InputError, match="another gfnet-edge train is writing this run folder"):
            train_folder(tiny_config(folder), run)
        assert not run.exists()
    finally:
        held.release()
    copy = tmp_path / "weights.pth"
    shutil.copyfile(weights, copy)
    train_folder(tiny_config(folder, pretrained=copy, epochs=(1, 1, 1)), run, stages=("stage1",))
    copy.unlink()
    from gfnet_edge.train.recipe import FolderTrainConfig

    cfg = FolderTrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    train_folder(cfg, run, stages=("stage2",), resume=True)
    assert (run / "stage2.pt").is_file()
    assert "the weights come from the run's stage checkpoints" in (run / "train.txt").read_text()


def test_training_reads_16_bit_images_with_the_levels_inference_sees(tmp_path):
    """A 16-bit grey PNG: training's dataset item has the levels the runtime's reader gives
    (30000 / 65535 of white: 117), not PIL's clipped 8-bit conversion (255)."""
    from gfnet_edge.data.images import load_images
    from gfnet_edge.train.folder_data import FolderDataset, build_transform, scan_dataset

    for split in ("train", "val"):
        for c, level in (("a", 30000), ("b", 10000)):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.full((40, 40), level, np.uint16)).save(tmp_path / split / c / "x.png")
    tr, va = scan_dataset(tmp_path, workers=2)
    assert len(tr) == 2 and not tr.skipped
    ds = FolderDataset(va, build_transform(32, 1.0, "bilinear", False))
    frames, labels = load_images(tmp_path / "val", 32, crop_pct=1.0)
    for i in range(2):
        x, label, _ = ds[i]
        want = frames[list(labels).index(label)]
        assert np.array_equal(x.permute(1, 2, 0).numpy(), want)
    assert sorted(int(frames[k, 0, 0, 0]) for k in range(2)) == [round(10000 * 255 / 65535), round(30000 * 255 / 65535)]


@pytest.mark.parametrize("then", [["--resume"], ["--resume", "--stage", "1"], ["--resume", "--stage", "export"]])
def test_the_gfnet_trained_after_its_static_baseline_is_the_one_exported(tmp_path, capsys, folder, weights, then):
    """A run that trained its static baseline first (--stage static) and its GFNet afterwards
    (--resume, or stage by stage) exports the GFNet its last stage trained: RUN/static.pt, which
    holds the GFNet as it was while the baseline trained, gives the static baseline alone."""
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "static", "--static-epochs", "1", "--pretrained",
                        weights], capsys)
    assert rc == 0, err
    common = ["-o", str(run), "--threads", "1", "--no-progress"]
    if then[-1] == "export":  # stages 1 to 3 first
        assert cli.main(["train", *common, "--resume", "--stage", "1"]) == 0, capsys.readouterr().err
        for stage in ("2", "3"):
            assert cli.main(["train", *common, "--resume", "--stage", stage]) == 0, capsys.readouterr().err
    assert cli.main(["train", *common, *then]) == 0, capsys.readouterr().err
    if then[-1] == "1":
        assert cli.main(["train", *common, "--resume"]) == 0, capsys.readouterr().err
    exported = load_checkpoint(run / "gfnet.pth.tar").state_dict()
    trained = _weights(run, "stage3")
    assert set(exported) == set(trained)
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert not torch.equal(trained["model.net.conv_stem.weight"], _weights(run, "static")["model.net.conv_stem.weight"])
    baseline = torch.load(run / "static.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    static = torch.load(run / "static.pt", map_location="cpu", weights_only=True)["models"]["static"]
    assert all(torch.equal(baseline[k], static[k]) for k in static)


@pytest.mark.parametrize("pretrained", [False, True])
def test_a_run_that_trained_only_its_static_baseline_starts_the_gfnet_from_it(tmp_path, capsys, folder, weights,
                                                                              monkeypatch, pretrained):
    """--stage static in a new run folder trains the static baseline alone; --resume then trains
    the GFNet, whose encoders start from that baseline when the run has no --pretrained (the log
    says so), and from the --pretrained weights the run recorded when it has them."""
    run = tmp_path / "run"
    given = ["--pretrained", weights] if pretrained else []
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "static", "--static-epochs", "1", *given], capsys)
    assert rc == 0, err
    start = {}

    def stage1(self, resume=True):  # the encoders as stage 1 begins
        start.update(glance=self.model.model_prime.net.state_dict(), focus=self.model.model.net.state_dict())
        start.update({k: {n: t.clone() for n, t in v.items()} for k, v in start.items()})

    monkeypatch.setattr(folder_stages.FolderTrainer, "stage1", stage1)
    rc = cli.main(["train", "-o", str(run), "--resume", "--stage", "1", "--threads", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    baseline = torch.load(run / "static.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    file = torch.load(weights, map_location="cpu", weights_only=True)
    for name, sd in start.items():
        assert set(sd) == set(baseline), name
        if pretrained:  # the file's weights outside the classifier (re-initialised: 1000 classes there)
            body = [k for k in sd if not k.startswith("classifier.")]
            assert body and all(torch.equal(sd[k], file[k]) for k in body), name
            assert not all(torch.equal(sd[k], baseline[k]) for k in body), name
        else:
            assert all(torch.equal(sd[k], baseline[k]) for k in sd), name
    line = [ln for ln in (run / "train.txt").read_text().splitlines() if "pretrained weights" in ln][-1]
    assert (f"the run's static baseline {run / 'static.pt'}" in line) != pretrained, line


@pytest.mark.parametrize("start", ["baseline", "file", "random"])
def test_the_exported_checkpoint_records_where_the_gfnets_encoders_started(tmp_path, capsys, folder, weights, start):
    """train_config in RUN/gfnet.pth.tar and RUN/config.json name where the GFNet's encoders
    started (gfnet_init): the run's own static baseline for a run that trained it first without
    --pretrained (whose pretrained stays null), the --pretrained file, or random weights; recorded
    when stage 1 begins, so an export in a later command still has it. The trainer alone writes it.
    ``gfnet-edge info`` on the checkpoint prints the folder and that start."""
    run = tmp_path / "run"
    resume = ["train", "-o", str(run), "--resume", "--threads", "1", "--no-progress"]
    given = ["--pretrained", weights] if start == "file" else []
    first = ["--stage", "1"] if start == "random" else ["--stage", "static", "--static-epochs", "1"]
    rc, err = _run_cli(["--data", folder, "-o", run, *first, *given], capsys)
    assert rc == 0, err
    if start != "random":  # the GFNet has not started yet
        assert json.loads((run / "config.json").read_text())["gfnet_init"] is None
        assert cli.main([*resume, "--stage", "1"]) == 0, capsys.readouterr().err
    for key in ("gfnet_init", "static_init"):
        rc, err = _run_cli(["--data", folder, "-o", run, "--resume", "--set", f'{key}="random"'], capsys)
        assert rc == 2 and len(err) == 1 and f"--set {key}: the trainer records" in err[0], err
    assert cli.main(resume) == 0, capsys.readouterr().err  # stages 2 and 3 and the export
    expected = {"baseline": str((run / "static.pt").resolve()), "file": str(Path(weights).resolve()),
                "random": "random"}[start]
    exported = torch.load(run / "gfnet.pth.tar", map_location="cpu", weights_only=True)["train_config"]
    recorded = json.loads((run / "config.json").read_text())
    for config in (exported, recorded):
        assert config["gfnet_init"] == expected
        assert config["pretrained"] == (expected if start == "file" else None)
        assert config["static_init"] == (None if start == "random" else expected if start == "file" else "random")
    capsys.readouterr()
    assert cli.main(["info", str(run / "gfnet.pth.tar")]) == 0  # info tells a user where it started
    started = {"random": "random weights"}.get(expected, expected)
    assert f"trained           on {Path(folder).resolve()} (" in capsys.readouterr().out
    assert cli.main(["info", str(run / "gfnet.pth.tar")]) == 0
    assert capsys.readouterr().out.count(f"; encoders started from {started}\n") == 1
    assert cli.main(["info", str(run / "gfnet.pth.tar"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_config"] == exported


def test_a_resume_through_train_folder_keeps_where_the_runs_networks_started(tmp_path, folder):
    """train_folder given a config without gfnet_init (a caller's own FolderTrainConfig) on a
    resumed run, with other workers: config.json records those workers and keeps where the
    GFNet's encoders started, and the export's train_config names that start too."""
    run = tmp_path / "run"
    train_folder(tiny_config(folder, epochs=(1, 1, 1)), run, stages=("stage1",))
    assert json.loads((run / "config.json").read_text())["gfnet_init"] == "random"  # no --pretrained
    train_folder(tiny_config(folder, epochs=(1, 1, 1), workers=1), run, stages=("stage2", "stage3"), resume=True)
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["gfnet_init"], recorded["workers"]) == ("random", 1), recorded
    exported = torch.load(run / "gfnet.pth.tar", map_location="cpu", weights_only=True)["train_config"]
    assert exported["gfnet_init"] == "random"


def test_resume_takes_pretrained_until_the_gfnet_of_a_run_that_trained_its_baseline_first_starts(
        tmp_path, capsys, folder, weights, monkeypatch):
    """A run that trained only its static baseline and recorded no --pretrained takes --resume
    --pretrained FILE: the GFNet's encoders start from FILE (not from the baseline), and
    config.json records it. Once a GFNet stage has a checkpoint, another --pretrained is refused
    saying so, and nothing of the run changes."""
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "static", "--static-epochs", "1"], capsys)
    assert rc == 0, err
    start, original = {}, folder_stages.FolderTrainer.stage1

    def stage1(self, *args, **kwargs):  # the encoders as stage 1 begins
        start.update(glance={k: t.clone() for k, t in self.model.model_prime.net.state_dict().items()},
                     focus={k: t.clone() for k, t in self.model.model.net.state_dict().items()})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(folder_stages.FolderTrainer, "stage1", stage1)
    resume = ["train", "-o", str(run), "--resume", "--stage", "1", "--threads", "1", "--no-progress"]
    assert cli.main([*resume, "--pretrained", str(weights)]) == 0, capsys.readouterr().err
    file = torch.load(weights, map_location="cpu", weights_only=True)
    baseline = torch.load(run / "static.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    for name, sd in start.items():  # the file's weights outside the classifier (1000 classes there)
        body = [k for k in sd if not k.startswith("classifier.")]
        assert body and all(torch.equal(sd[k], file[k]) for k in body), name
        assert not all(torch.equal(sd[k], baseline[k]) for k in body), name
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["pretrained"] == str(Path(weights).resolve()) == recorded["gfnet_init"]
    assert recorded["static_init"] == "random"  # the baseline, trained before, started from random weights
    assert torch.load(run / "static.pth.tar", map_location="cpu", weights_only=True)["started_from"] == "random"
    other = tmp_path / "other.pth"
    shutil.copyfile(weights, other)
    kept = {f: (run / f).read_bytes() for f in ("config.json", "stage1.pt", "static.pt")}
    capsys.readouterr()
    assert cli.main([*resume, "--pretrained", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would change pretrained" in err[0], err
    assert f"this run's GFNet has started training ({run / 'stage1.pt'})" in err[0], err
    assert kept == {f: (run / f).read_bytes() for f in kept}


def test_resume_refuses_options_that_would_change_the_run(tmp_path, capsys, folder):
    """--resume takes the run's settings from RUN/config.json: repeating them is fine, changing one
    is refused naming the setting, and so is --data naming a folder of other images under the
    same names; nothing more is trained."""
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    before = (run / "stage1.pt").read_bytes()
    for args, names in ((["--epochs", "5"], "stage1.epochs, stage2.epochs, stage3.epochs"),
                        (["--batch-size", "3"], "batch_size"), (["--backbone", "test_resnet"], "backbone")):
        rc, err = _run_cli(["--data", folder, "-o", run, "--resume", *args], capsys)
        assert rc == 2 and len(err) == 1 and f"would change {names}:" in err[0], (args, err)
    other = make_folder(tmp_path / "elsewhere", seed=1)  # other images under the same names
    rc, err = _run_cli(["--data", other, "-o", run, "--resume"], capsys)
    assert rc == 2 and len(err) == 1 and f"{other}: holds other images than the run's data folder {folder}" in err[0]
    assert json.loads((run / "config.json").read_text())["data"] == str(folder)
    assert (run / "stage1.pt").read_bytes() == before
    rc, err = _run_cli(["--data", folder, "-o", run, "--resume", "--stage", "1", "--workers", "1"], capsys)
    assert rc == 0, err  # the same settings as the run's (the CLI repeats them), another worker count


def test_a_run_config_edited_to_values_of_another_type_is_named_on_resume(tmp_path, capsys, folder):
    """RUN/config.json edited by hand (a number written as a string, a stage plan replaced by a
    number): --resume names the file and the field in one line (exit 2) and trains nothing."""
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    good = json.loads((run / "config.json").read_text())
    for keys, value, message in ((("batch_size",), "6", 'batch_size takes an integer, got "6"'),
                                 (("stage2", "epochs"), "40", 'stage2.epochs takes an integer, got "40"'),
                                 (("stage3",), 5, "stage3 takes an object of epochs, lr, iters, batch, minutes, got 5")):
        d = json.loads(json.dumps(good))
        (d[keys[0]] if len(keys) > 1 else d)[keys[-1]] = value
        (run / "config.json").write_text(json.dumps(d))
        rc = cli.main(["train", "-o", str(run), "--resume", "--threads", "1", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0] == (
            f"gfnet-edge: error: {run / 'config.json'}: not a run config of gfnet-edge train --data ({message})"), err
        assert not (run / "stage2.pt").exists()
    # edits that no longer say it is an image-folder run: named as well, not trained as the demo task
    for edited in ([1, 2], dict(good, data=5)):
        (run / "config.json").write_text(json.dumps(edited))
        rc = cli.main(["train", "-o", str(run), "--resume", "--threads", "1", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(
            f"gfnet-edge: error: {run / 'config.json'}: not a run config of gfnet-edge train ("), err
        assert not (run / "stage2.pt").exists()


def _static_val_accuracy(path: Path, folder: Path):
    """A static baseline file's metadata and its accuracy (%) on ``folder/val``, computed here."""
    from gfnet_edge.data.images import load_images
    from gfnet_edge.train.static import load_static

    net, meta = load_static(path)
    frames, labels = load_images(folder / "val", meta["image_size"], crop_pct=1.0)  # the trainer's val crop
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (meta["mean"], meta["std"]))
    with torch.no_grad():
        pred = net.eval()(((torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255) - mean) / std).argmax(1)
    return meta, 100.0 * float((pred.numpy() == labels).mean())


def test_a_static_baseline_trained_on_its_own_is_written_and_serves_as_pretrained_weights(tmp_path, capsys, folder):
    """``--stage static --static-epochs N`` in a new run folder writes RUN/static.pth.tar (named
    in the log), which `calibrate --static` and another run's ``--pretrained`` read."""
    run = tmp_path / "static"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "static", "--static-epochs", "1"], capsys)
    assert rc == 0, err
    assert not (run / "gfnet.pth.tar").exists() and not (run / "results.json").exists()
    meta, accuracy = _static_val_accuracy(run / "static.pth.tar", folder)
    assert meta["backbone"] == "test_efficientnet" and meta["val_accuracy"] == pytest.approx(accuracy, abs=0.01)
    assert str(run / "static.pth.tar") in (run / "train.txt").read_text()
    # where a GFNet checkpoint goes, the baseline is refused naming the file the run would write
    for src in (run / "static.pth.tar", run / "static.pt"):
        rc = cli.main(["build-engine", str(src), "-o", str(tmp_path / "b"), "--precision", "fp32", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].endswith(
            f"not a GFNet checkpoint: use {run / 'gfnet.pth.tar'}, which the run writes at its end (it holds none "
            "yet)"), (src, err)
        assert not (tmp_path / "b").exists()
    rc, err = _run_cli(["--data", folder, "-o", tmp_path / "gfnet", "--pretrained", run / "static.pth.tar"], capsys)
    assert rc == 0, err
    assert f"pretrained weights: {run / 'static.pth.tar'}" in (tmp_path / "gfnet" / "train.txt").read_text()


def test_pretrained_given_a_run_folder_or_a_stage_checkpoint_names_the_runs_static_baseline(tmp_path, capsys, folder):
    """``--pretrained`` pointed at a training run (its folder, or a stage checkpoint in it) is one
    line naming the file it reads from a run, RUN/static.pth.tar, or how to train it."""
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    train_one = f"`gfnet-edge train -o {run} --resume --stage static --static-epochs N` trains one"
    for given in (run, run / "stage1.pt"):
        rc, err = _run_cli(["--data", folder, "-o", tmp_path / "r", "--pretrained", given], capsys)
        assert rc == 2 and len(err) == 1 and train_one in err[0] and "stage1.pt," not in err[0], (given, err)
        assert not (tmp_path / "r").exists()
    rc, err = _run_cli(["-o", run, "--resume", "--stage", "static", "--static-epochs", "1"], capsys)
    assert rc == 0, err
    for given in (run, run / "static.pt", run / "stage1.pt"):
        rc, err = _run_cli(["--data", folder, "-o", tmp_path / "r", "--pretrained", given], capsys)
        assert rc == 2 and len(err) == 1 and err[0].endswith(f"pass its static baseline {run / 'static.pth.tar'}"), \
            (given, err)
        assert not (tmp_path / "r").exists()


def test_a_run_folder_given_where_a_bundle_goes_names_the_build_engine_command(tmp_path, capsys, folder):
    """predict, calibrate, info and Runtime given a training run folder instead of a bundle: one
    line naming the command that builds a bundle from the run's checkpoint."""
    from gfnet_edge import Runtime
    from gfnet_edge.bundle import BundleError

    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1"], capsys)  # not exported yet
    assert rc == 0, err
    build = f"`gfnet-edge build-engine {run / 'gfnet.pth.tar'} -o BUNDLE` builds one from its checkpoint"
    with pytest.raises(BundleError, match="a gfnet-edge train run folder, not a bundle") as exc:
        Runtime(run)
    assert str(exc.value).endswith(f"{build} (which the run writes at its end)")
    rc, err = _run_cli(["--data", folder, "-o", run, "--resume", "--stage", "export"], capsys)
    assert rc == 0 and (run / "gfnet.pth.tar").is_file(), err
    image = str(folder / "val" / "red" / "0.png")
    for args in (["predict", str(run), image], ["info", str(run)],
                 ["calibrate", str(run), "--data", str(folder / "val"), "-o", str(tmp_path / "report")]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"gfnet-edge: error: {run}: a gfnet-edge train run folder, not a bundle: {build}"], (args, err)
    assert not (tmp_path / "report").exists()


def test_a_static_baseline_is_added_to_a_finished_run(tmp_path, capsys, folder):
    """``--resume --stage static --static-epochs N`` on an exported run without a baseline trains
    one, writes RUN/static.pth.tar, adds it to results.json and leaves the GFNet's files as they
    were; once the run has a baseline its settings are fixed again."""
    from gfnet_edge.data.images import load_images
    from gfnet_edge.train.static import load_static

    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run], capsys)
    assert rc == 0, err
    gfnet_files = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".pt", ".tar")}
    before = json.loads((run / "results.json").read_text())
    assert "static_accuracy" not in before and not (run / "static.pth.tar").exists()
    rc, err = _run_cli(["--data", folder, "-o", run, "--resume", "--stage", "static"], capsys)
    assert rc == 2 and len(err) == 1 and "--static-epochs N" in err[0]
    good = (run / "results.json").read_bytes()
    (run / "results.json").write_text("{broken")  # read before anything trains
    rc, err = _run_cli(["--data", folder, "-o", run, "--resume", "--stage", "static", "--static-epochs", "1"], capsys)
    assert rc == 2 and len(err) == 1 and "cannot read the run's results" in err[0] and not (run / "static.pt").exists()
    (run / "results.json").write_bytes(good)

    rc, err = _run_cli(["--data", folder, "-o", run, "--resume", "--stage", "static", "--static-epochs", "1"], capsys)
    assert rc == 0, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name in gfnet_files} == gfnet_files
    assert json.loads((run / "config.json").read_text())["static"]["epochs"] == 1
    after = json.loads((run / "results.json").read_text())
    assert {k: v for k, v in after.items() if not k.startswith("static_")} == before
    meta, accuracy = _static_val_accuracy(run / "static.pth.tar", folder)
    assert after["static_accuracy"] == meta["val_accuracy"] == pytest.approx(accuracy, abs=0.01)
    assert after["static_macs"] == meta["macs"] > 0

    static_pt = (run / "static.pt").read_bytes()
    rc, err = _run_cli(["--data", folder, "-o", run, "--resume", "--stage", "static", "--static-epochs", "2"], capsys)
    assert rc == 2 and len(err) == 1 and "would change static.epochs" in err[0] and "no static.pt" in err[0]
    assert (run / "static.pt").read_bytes() == static_pt


def test_an_export_leaves_out_a_static_baseline_the_run_has_not_trained(tmp_path, capsys, folder):
    """A run with a static baseline (--static-epochs) that trains its GFNet stage by stage and
    exports before the baseline trained exports the GFNet alone: no RUN/static.pth.tar of
    untrained weights, no static figures in results.json, and the log says how to add the
    baseline; --stage static then trains it and adds it."""
    from gfnet_edge.train.static import load_static

    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--static-epochs", "1", "--stage", "1"], capsys)
    assert rc == 0, err
    resume = ["train", "-o", str(run), "--resume", "--threads", "1", "--no-progress"]
    assert cli.main([*resume, "--stage", "3"]) == 0, capsys.readouterr().err  # stages 2 and 3, the export
    results = json.loads((run / "results.json").read_text())
    assert not (run / "static.pth.tar").exists() and not [k for k in results if k.startswith("static")], results
    assert f"gfnet-edge train -o {run} --resume --stage static" in (run / "train.txt").read_text()
    assert cli.main([*resume, "--stage", "static"]) == 0, capsys.readouterr().err
    trained = torch.load(run / "static.pt", map_location="cpu", weights_only=True)
    assert trained["done"] and json.loads((run / "results.json").read_text())["static_accuracy"] >= 0
    exported, _ = load_static(run / "static.pth.tar")
    assert all(torch.equal(v, trained["models"]["static"][k].float() if v.is_floating_point() else
                           trained["models"]["static"][k]) for k, v in exported.state_dict().items())


def test_a_command_without_data_resumes_an_image_folder_run_and_never_trains_the_demo_into_it(tmp_path, capsys,
                                                                                             folder):
    """Without --data, `train -o RUN` is the demo trainer: on a folder that holds an image-folder
    run it is refused with one line (the run's config and checkpoints untouched), and with
    --resume it continues that run, whose config names its data. (--resume on a folder without a
    run starts one, and says so.)"""
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1", "--resume"], capsys)
    assert rc == 0, err
    assert f"--resume: {run} holds no run yet, so a new one starts" in (run / "train.txt").read_text()
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    rc = cli.main(["train", "-o", str(run), "--tiny", "--no-progress", "--stage", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"holds a run trained on the image folder {folder}" in err[0], err
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    rc = cli.main(["train", "-o", str(run), "--resume", "--stage", "2", "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert (run / "stage2.pt").is_file() and (run / "config.json").read_bytes() == before["config.json"]
    assert "weights after stage1 loaded" in (run / "train.txt").read_text()


def _how_started(pid: int) -> str:
    """How the live child process ``pid`` of this process was started, read from ``/proc``:
    ``forkserver`` (its parent is multiprocessing's fork server), ``spawn`` (a new interpreter
    running multiprocessing's spawn entry point) or ``fork`` (a copy of this process: its parent
    and command line are this process's)."""
    def read(p, name):
        return Path(f"/proc/{p}/{name}").read_bytes()

    parent = int(read(pid, "stat").rsplit(b")", 1)[1].split()[1])
    if parent != os.getpid():
        return "forkserver" if b"multiprocessing.forkserver" in read(parent, "cmdline") else f"child of {parent}"
    if b"multiprocessing.spawn" in read(pid, "cmdline"):
        return "spawn"
    return "fork" if read(pid, "cmdline") == read("self", "cmdline") else "other"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads how the workers started from /proc")
def test_worker_start_chooses_how_the_dataloader_workers_start(tmp_path, capsys, folder, monkeypatch):
    """--worker-start METHOD starts the DataLoader workers of training and validation by METHOD
    (seen from /proc while they run), is recorded in RUN/config.json, is used again by --resume
    and, like --workers, may change on --resume."""
    import multiprocessing

    from gfnet_edge.train.folder_stages.sigint import SIGINT

    seen = []
    started = SIGINT.started

    def recording(loader):
        before = set(multiprocessing.active_children())
        it = started(loader)
        seen.extend(_how_started(p.pid) for p in set(multiprocessing.active_children()) - before)
        return it

    monkeypatch.setattr(SIGINT, "started", recording)
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1", "--workers", "1", "--threads", "1",
                        "--worker-start", "spawn"], capsys)
    assert rc == 0, err
    assert seen == ["spawn", "spawn"], seen  # stage 1's epoch and its validation
    assert json.loads((run / "config.json").read_text())["worker_start"] == "spawn"
    for given, want in (([], "spawn"), (["--worker-start", "forkserver"], "forkserver")):
        seen.clear()
        rc = cli.main(["train", "-o", str(run), "--resume", "--stage", "export", "--threads", "1", "--no-progress",
                       *given])
        assert rc == 0, capsys.readouterr().err
        assert seen == [want], (given, seen)  # the export's validation
        assert json.loads((run / "config.json").read_text())["worker_start"] == want  # kept for later resumes


def test_worker_start_without_workers_is_logged_as_having_no_effect(tmp_path, capsys, folder):
    """--worker-start with --workers 0 (no worker processes) trains, and the log says once that
    it has no effect; the run keeps the method for a --resume that gives workers, which logs no
    such line."""
    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1", "--threads", "1", "--worker-start", "fork"],
                       capsys)
    assert rc == 0, err
    note = "--worker-start fork has no effect: with --workers 0 the images are loaded in the training process"
    lines = (run / "train.txt").read_text().splitlines()
    assert len([ln for ln in lines if "--worker-start" in ln]) == 1 and note in "".join(lines), lines
    rc = cli.main(["train", "-o", str(run), "--resume", "--stage", "export", "--threads", "1", "--no-progress",
                   "--workers", "1"])
    assert rc == 0, capsys.readouterr().err
    later = (run / "train.txt").read_text().splitlines()[len(lines):]
    assert later and not [ln for ln in later if "--worker-start" in ln], later


@pytest.mark.parametrize("args, message", [
    (["--worker-start", "thread"], "argument --worker-start: invalid choice: 'thread'"),
    (["--worker-start", "fork"], "worker start method fork (--worker-start, or the run's config.json on --resume): "
                                 "this platform cannot start processes by fork (its start methods: spawn); give "
                                 "--worker-start with one of them"),
    (["--set", 'worker_start="thread"'], "worker start method thread (--worker-start, or the run's config.json on "
                                         "--resume): this platform cannot start processes by thread (its start "
                                         "methods: spawn)"),
])
def test_a_worker_start_method_the_platform_lacks_is_refused(tmp_path, capsys, folder, monkeypatch, args, message):
    """A start method that is not one, or that the platform lacks (here one with spawn only, as
    Windows), ends the command with one line before anything is written."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    rc, err = _run_cli(["--data", folder, "-o", tmp_path / "r", *args], capsys)
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_a_run_whose_recorded_worker_start_this_platform_lacks_resumes_with_another(tmp_path, capsys, folder,
                                                                                   monkeypatch):
    """A run recorded with a start method the resuming platform lacks is refused in one line that
    says the method comes from the run's config.json and how to choose another; --resume with
    --worker-start of this platform goes on, and the run records it (as it records --workers
    given on --resume), so a later --resume without it goes on too."""
    import multiprocessing

    run = tmp_path / "r"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1", "--worker-start", "fork"], capsys)
    assert rc == 0, err
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    resume = ["train", "-o", str(run), "--resume", "--stage", "2", "--threads", "1", "--no-progress"]
    assert cli.main(resume) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "worker start method fork (--worker-start, or the run's config.json" in err[0], err
    assert not (run / "stage2.pt").exists()
    assert cli.main([*resume, "--worker-start", "spawn", "--workers", "1"]) == 0, capsys.readouterr().err
    assert (run / "stage2.pt").exists()
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["worker_start"], recorded["workers"]) == ("spawn", 1), recorded
    resume[resume.index("2")] = "3"
    assert cli.main(resume) == 0, capsys.readouterr().err
    assert (run / "stage3.pt").exists()


def test_default_workers_are_at_most_the_cpus_the_process_may_use():
    """One CPU allowed: one DataLoader worker by default (torch warns when there are more)."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from gfnet_edge.train.recipe import FolderTrainConfig, TrainSettings; "
            "print(TrainSettings().workers, FolderTrainConfig(data='d', backbone='b').workers)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0 and p.stdout.split() == ["1", "1"], p.stderr[-2000:]


def test_a_run_stopped_before_it_saved_an_epoch_starts_again_with_other_settings(tmp_path, capsys, folder,
                                                                                 monkeypatch):
    """Ctrl-C in a run's first epoch leaves its config.json, data index and log and no stage
    checkpoint: nothing can be continued, so the command again without --resume, with other
    options (a shorter schedule, another data folder), starts the run anew; --resume with other
    options says so."""
    def interrupted(self):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    monkeypatch.setattr(folder_stages.FolderTrainer, "evaluate", interrupted)
    rc, err = _run_cli(["--data", folder, "-o", run, "--epochs", "30"], capsys)
    monkeypatch.undo()
    assert rc == 130 and sorted(p.name for p in run.iterdir()) == ["config.json", "data_index.json", "train.txt"]
    rc, err = _run_cli(["--data", folder, "-o", run, "--resume"], capsys)  # _run_cli gives --epochs 1
    assert rc == 2 and len(err) == 1 and "without --resume it starts again with those options" in err[0], err
    other = make_folder(tmp_path / "other", n_train=4, n_val=2, classes=("blue", "red"))
    rc, err = _run_cli(["--data", other, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["data"], cfg["classes"], cfg["stage1"]["epochs"]) == (str(other), ["blue", "red"], 1)
    assert json.loads((run / "data_index.json").read_text())["train"]["root"] == str(other / "train")
    assert "starts again with these settings" in (run / "train.txt").read_text()
    assert torch.load(run / "stage1.pt", weights_only=True)["done"]


def test_existing_run_needs_resume(tmp_path, capsys, folder):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    rc, err = _run_cli(["--data", folder, "-o", run], capsys)
    assert rc == 2 and len(err) == 1 and "pass --resume" in err[0]
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "notes.txt"]


def test_timm_download_failure_is_one_clear_line(monkeypatch):
    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore detail")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UnavailableError, match=r"cannot fetch timm's pretrained weights for 'resnet50'.*--pretrained FILE") as e:
        timm_pretrained_state("resnet50", 3)
    assert "\n" not in str(e.value)


def test_help_names_what_the_run_writes(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at spaces and hyphens
    for needle in ("RUN/gfnet.pth.tar", "gfnet-edge build-engine", "RUN/results.json", "RUN/train.txt",
                   "--resume continues", "30, 10, 10 epochs"):
        assert "".join(needle.split()) in text, needle


def test_stage_order_is_the_papers():
    assert STAGE_ORDER[:3] == ("stage1", "stage2", "stage3")
    with pytest.raises(InputError):
        from gfnet_edge.train.folder_cli import parse_epochs

        parse_epochs("a,b,c")


def test_cascaded_heads_start_as_a_product_of_experts():
    from types import SimpleNamespace

    from gfnet_edge.models.gfnet import GFNet

    cfg = FolderTrainConfig(backbone="test_efficientnet", image_size=64, patch_size=32).resolved()
    torch.manual_seed(0)
    model = GFNet(cfg.spec(3))
    folder_stages.FolderTrainer.init_cascaded_heads(SimpleNamespace(model=model, spec=model.spec))
    feats = [torch.randn(5, model.spec.feature_dim) for _ in range(model.spec.steps)]
    for k in range(2, model.spec.steps + 1):
        expected = model.model_prime.logits(feats[0]) + sum(model.model.logits(f) for f in feats[1:k])
        torch.testing.assert_close(model.fc.cascaded(feats[:k]), expected, rtol=1e-5, atol=1e-5)


def test_batch_larger_than_the_train_split_is_refused(tmp_path, capsys, folder):
    rc, err = _run_cli(["--data", folder, "-o", tmp_path / "r", "--batch-size", "64"], capsys)
    assert rc == 2 and len(err) == 1 and "fewer than one batch (64)" in err[0], err
    assert not (tmp_path / "r").exists()


def test_every_stage_runs_under_bfloat16_autocast(folder, tmp_path, monkeypatch):
    # The GPU path's mixed precision (bf16 activations, float32 losses, PPO update in float32),
    # exercised with the CPU's autocast: every stage must run and keep finite losses.
    monkeypatch.setattr(folder_stages.FolderTrainer, "autocast",
                        lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    cfg = tiny_config(folder, backbone="test_resnet", epochs=(1, 1, 1), fc_hidden=32, policy_hidden=32, steps=3,
                      eval_max=3)
    res = train_folder(cfg, tmp_path / "r")
    history = [json.loads(line) for line in (tmp_path / "r" / "epochs.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history] == ["stage1", "stage2", "stage3"]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert len(res["anytime_accuracy"]) == 3


def test_the_demo_task_is_written_as_an_image_folder_whole_or_not_at_all(tmp_path, capsys):
    """``python -m gfnet_edge.train.demo_folder``: each image lands in its digit's folder of its
    split (the frames of the demo's train and test splits, losslessly); counts whose first
    images leave a digit out are refused naming the digit and the option, with nothing
    written; an existing folder is refused."""
    from gfnet_edge.train import demo_folder
    from gfnet_edge.train.config import data_config_from_dict
    from gfnet_edge.train.data import load_split
    from gfnet_edge.train.demo_results import GFNET_PATH

    root = tmp_path / "digits"
    cfg = data_config_from_dict(load_checkpoint(GFNET_PATH).meta["demo_data"]["config"])
    missing = sorted(set(range(10)) - set(load_split("test", 20, config=cfg, workers=1, progress=False).labels.tolist()))
    assert len(missing) == 1  # the first 20 test images lack one digit
    assert demo_folder.main([str(root), "--train", "40", "--val", "20", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--val 20" in err and f"no digit {missing[0]}," in err, err
    assert os.listdir(tmp_path) == []  # no folder, no staging folder

    assert demo_folder.main([str(root), "--train", "40", "--val", "30", "--workers", "1"]) == 0
    for folder, split, n in (("train", "train", 40), ("val", "test", 30)):
        want = load_split(split, n, config=cfg, workers=1, progress=False)
        assert sorted(os.listdir(root / folder)) == [str(k) for k in range(10)]
        files = sorted((root / folder).glob("*/*.png"))
        assert len(files) == n
        for f in files:
            i = int(f.stem)
            assert int(f.parent.name) == int(want.labels[i])
            assert np.array_equal(np.asarray(Image.open(f)), want.frames[i])
    assert os.listdir(tmp_path) == ["digits"]
    capsys.readouterr()
    assert demo_folder.main([str(root), "--train", "40", "--val", "30"]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_demo_folder_interrupted_while_its_images_are_written_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A Ctrl-C (KeyboardInterrupt) after some of the demo folder's images are written leaves
    neither ROOT nor a staging folder: the folder is written whole or not at all, and the
    command says so in one line, exit 130."""
    from gfnet_edge.train import demo_folder

    saved, save = [], Image.Image.save

    def interrupted_save(self, fp, *args, **kwargs):
        if len(saved) == 25:  # train's 40 images are being written
            raise KeyboardInterrupt
        saved.append(fp)
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    assert demo_folder.main([str(tmp_path / "digits"), "--train", "40", "--val", "30", "--workers", "1"]) == 130
    assert len(saved) == 25 and os.listdir(tmp_path) == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted; nothing was written to" in err, err


def test_a_demo_folder_interrupted_as_its_generator_processes_end_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A Ctrl-C that comes while the demo folder's generator processes end (inside
    multiprocessing's bookkeeping, where it is only recorded) stops the command before the
    folder is written: exit 130, one line, no ROOT, no staging folder."""
    from gfnet_edge.train import data, demo_folder

    original = data.load_split

    def load_split(split, *args, **kwargs):
        s = original(split, *args, **kwargs)
        if split == "test":  # the val images, generated last
            _ctrl_c_in_a_multiprocessing_finalizer()
        return s

    monkeypatch.setattr(data, "load_split", load_split)
    assert demo_folder.main([str(tmp_path / "digits"), "--train", "40", "--val", "30", "--workers", "1"]) == 130
    assert os.listdir(tmp_path) == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted; nothing was written to" in err, err


def test_a_gfnet_checkpoint_as_pretrained_weights_says_which_of_its_parts_it_gives():
    """A GFNet checkpoint given as ``--pretrained``: its focus encoder (``model_state_dict``) is
    the backbone state read, and the note for the log after its path says so and that the rest is
    unused; a plain state dict gets no note."""
    import torch

    from gfnet_edge.demo import DEMO_CHECKPOINT
    from gfnet_edge.train.pretrained import read_weights_file

    sd, note = read_weights_file(str(DEMO_CHECKPOINT), "resnet18")
    want = torch.load(DEMO_CHECKPOINT, map_location="cpu", weights_only=True)["model_state_dict"]
    assert sd.keys() == {k[len("module."):] if k.startswith("module.") else k for k in want}
    assert all(torch.equal(sd[k[len("module."):] if k.startswith("module.") else k], v.float()) for k, v in want.items())
    assert note.startswith(" (a GFNet checkpoint: its focus encoder") and "not used" in note
    plain = Path(DEMO_CHECKPOINT).parent / "demo_static.pth.tar"
    assert read_weights_file(str(plain), "resnet18")[1] == ""


def test_a_run_goes_on_with_its_images_moved_to_another_folder(tmp_path, capsys, folder):
    """The data folder moved after a stage: ``--resume`` alone says where to give the new one,
    ``--data NEW --resume`` goes on with the same images there (the run's config and data index
    name the new folder), and a new folder without some of the run's images is refused naming
    the first missing one; a copy made while the run's folder is still there is taken too."""
    data, run = tmp_path / "a", tmp_path / "run"
    shutil.copytree(folder, data)
    rc, err = _run_cli(["--data", data, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    index_before = json.loads((run / "data_index.json").read_text())
    moved = tmp_path / "b"
    data.rename(moved)
    rc = cli.main(["train", "-o", str(run), "--resume", "--stage", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{data}: no such folder" in err[0] and "--data NEW --resume" in err[0], err
    partial = tmp_path / "c"
    shutil.copytree(moved, partial)
    gone = Path(index_before["val"]["samples"][0][0]).relative_to(data)
    (partial / gone).unlink()
    rc, err = _run_cli(["--data", partial, "-o", run, "--resume", "--stage", "1"], capsys)
    assert rc == 2 and len(err) == 1 and str(partial / gone) in err[0], err
    assert json.loads((run / "config.json").read_text())["data"] == str(data)  # nothing of the run changed
    rc, err = _run_cli(["--data", moved, "-o", run, "--resume", "--stage", "2"], capsys)
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["data"] == str(moved)
    index = json.loads((run / "data_index.json").read_text())
    for split in ("train", "val"):
        assert index[split]["root"] == str(moved / split)
        assert [(str(Path(f).relative_to(moved)), lab) for f, lab in index[split]["samples"]] == \
            [(str(Path(f).relative_to(data)), lab) for f, lab in index_before[split]["samples"]]
    again = tmp_path / "d"  # a copy, the run's folder still there (a local disk): the same images
    shutil.copytree(moved, again)
    rc, err = _run_cli(["--data", again, "-o", run, "--resume", "--stage", "3"], capsys)
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["data"] == str(again)


def test_a_moved_run_given_its_new_folder_relative_to_the_working_folder_names_it_absolute(tmp_path, capsys,
                                                                                          folder, monkeypatch):
    """``--data NEW --resume`` with ``NEW`` relative to the working folder: the run's config and
    data index name the folder resolved, as a fresh run's do, so ``--resume`` alone (which reads
    the folder from the config) goes on from another working folder."""
    data, run = tmp_path / "a", tmp_path / "run"
    shutil.copytree(folder, data)
    rc, err = _run_cli(["--data", data, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    data.rename(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    rc, err = _run_cli(["--data", "b", "-o", run, "--resume", "--stage", "1"], capsys)
    assert rc == 0, err
    moved = (tmp_path / "b").resolve()
    assert json.loads((run / "config.json").read_text())["data"] == str(moved)
    index = json.loads((run / "data_index.json").read_text())
    assert [index[k]["root"] for k in ("train", "val")] == [str(moved / "train"), str(moved / "val")]
    assert all(Path(f).is_absolute() for k in ("train", "val") for f, _ in index[k]["samples"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rc = cli.main(["train", "-o", str(run), "--resume", "--stage", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err


def test_a_gfnet_checkpoint_that_does_not_fit_the_backbone_is_refused_naming_its_path(tmp_path, capsys, folder):
    """A GFNet checkpoint of another backbone given as ``--pretrained``: the line names the file
    and that it does not fit, without the log's words that its focus encoder starts both
    encoders (it starts none); nothing is written."""
    from gfnet_edge.demo import DEMO_CHECKPOINT

    run = tmp_path / "run"
    rc, err = _run_cli(["--data", folder, "-o", run, "--stage", "1", "--pretrained", DEMO_CHECKPOINT], capsys)
    assert rc == 2 and len(err) == 1, err
    assert f"{Path(DEMO_CHECKPOINT).resolve()} does not fit this backbone: " in err[0], err
    assert "starts both encoders" not in err[0], err
    assert not run.exists()


def test_a_static_baseline_is_added_to_a_run_whose_images_moved(tmp_path, capsys, folder):
    """``--data NEW --resume --stage static --static-epochs N`` on a run without a static
    baseline whose images moved: the baseline is trained on the images there, and the run's
    config names NEW and the baseline's epochs."""
    data, run = tmp_path / "a", tmp_path / "run"
    shutil.copytree(folder, data)
    rc, err = _run_cli(["--data", data, "-o", run, "--stage", "1"], capsys)
    assert rc == 0, err
    data.rename(tmp_path / "b")
    rc, err = _run_cli(["--data", tmp_path / "b", "-o", run, "--resume", "--stage", "static", "--static-epochs", "1"],
                       capsys)
    assert rc == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"] == str(tmp_path / "b") and cfg["static"]["epochs"] == 1
    assert (run / "static.pth.tar").is_file()
