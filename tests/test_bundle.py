"""Bundle format: atomic writes, hashes, tampering, unsafe paths, versions (numpy only)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from gfnet_edge.bundle import (FORMAT_VERSION, Bundle, BundleError, new_manifest, record_artifacts, safe_join,
                               staging_dir, write_json_atomic)
from gfnet_edge.errors import InputError
from child_python import PYTHON


#: A complete ``model`` entry (what manifest_model writes for a small model).
MODEL = {"model_name": "x", "image_size": 32, "patch_size": 16, "steps": 3, "num_classes": 10, "crop_pct": 1.0,
         "dataset_interpolation": "bilinear", "glance_interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
         "std": [0.229, 0.224, 0.225], "classifier": "cascaded", "step0": "backbone"}


def _make(root, model=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "graphs").mkdir(exist_ok=True)
    (root / "graphs" / "glance.fp32.onnx").write_bytes(b"g" * 100)
    (root / "graphs" / "focus.fp32.onnx").write_bytes(b"f" * 100)
    (root / "heads.npz").write_bytes(b"h" * 10)
    m = new_manifest(model or dict(MODEL), {"macs": {}})
    m["graphs"]["fp32"] = {"glance": "graphs/glance.fp32.onnx", "focus": "graphs/focus.fp32.onnx"}
    m["budgets"] = {"mid": {"thresholds": [0.9, 0.8, -1e8]}}
    m["default_budget"] = "mid"
    record_artifacts(root, m)
    write_json_atomic(root / "manifest.json", m)
    return m


def test_round_trip_and_accessors(tmp_path):
    _make(tmp_path / "b")
    b = Bundle.load(tmp_path / "b")
    assert set(b.graph_paths("fp32")) == {"glance", "focus"}
    assert b.thresholds(None) == [pytest.approx(0.9), pytest.approx(0.8), -1e8]
    with pytest.raises(BundleError, match="no budget named 'fast'"):
        b.thresholds("fast")
    with pytest.raises(BundleError, match="no 'int8-cpu' graphs"):
        b.graph_paths("int8-cpu")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda r: (r / "graphs" / "focus.fp32.onnx").write_bytes(b"evil"), "modified or corrupted"),
        (lambda r: (r / "heads.npz").unlink(), "missing"),
        (lambda r: (r / "manifest.json").write_text("{not json"), "corrupt manifest"),
        (lambda r: (r / "manifest.json").unlink(), "no manifest.json"),
        (lambda r: _edit(r, format_version=FORMAT_VERSION + 1), "format version"),
        (lambda r: _edit(r, format="something-else"), "not a gfnet-edge manifest"),
        (lambda r: _edit_art(r, "../../etc/passwd"), "escapes the bundle"),
        (lambda r: _edit_art(r, "/etc/passwd"), "unsafe artifact path"),
        (lambda r: ((r / "heads.npz").unlink(), (r / "heads.npz").symlink_to("heads.npz")), "symbolic link loop"),
        (lambda r: os.truncate(r / "manifest.json", 65 << 20), "a manifest is at most 64 MiB"),  # not read whole
    ],
)
def test_bad_bundles(tmp_path, mutate, match):
    root = tmp_path / "b"
    _make(root)
    mutate(root)
    with pytest.raises(BundleError, match=match):
        Bundle.load(root)


def _edit(root, **kw):
    m = json.loads((root / "manifest.json").read_text())
    m.update(kw)
    (root / "manifest.json").write_text(json.dumps(m))


def _edit_art(root, rel):
    m = json.loads((root / "manifest.json").read_text())
    m["artifacts"][rel] = {"sha256": "0" * 64, "bytes": 1}
    (root / "manifest.json").write_text(json.dumps(m))


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        Bundle.load(tmp_path / "nope")
    f = tmp_path / "file.pth.tar"
    f.write_bytes(b"x")
    with pytest.raises(BundleError, match="is a directory"):
        Bundle.load(f)


def test_safe_join(tmp_path):
    assert safe_join(tmp_path, "a/b.onnx") == (tmp_path / "a" / "b.onnx").resolve()
    for bad in ("", "/abs", "../x", "a/../../x", "C:/x", "a\x00b"):
        with pytest.raises(BundleError):
            safe_join(tmp_path, bad)


def test_staging_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError):
        with staging_dir(out) as tmp:
            (tmp / "partial.onnx").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_staging_failure_removes_the_parent_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper" / "bundle"
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(out) as tmp:
            (tmp / "partial.onnx").write_bytes(b"x")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
    with staging_dir(out) as tmp:
        (tmp / "done.onnx").write_bytes(b"x")
    assert (out / "done.onnx").read_bytes() == b"x"


def test_staging_refuses_existing_without_force(tmp_path):
    out = tmp_path / "bundle"
    _make(out)
    with pytest.raises(BundleError, match="already exists"):
        with staging_dir(out):
            pass
    with staging_dir(out, force=True) as tmp:
        _make(tmp, {**MODEL, "model_name": "new"})
    assert Bundle.load(out).model.model_name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _listing(root):
    return {q.relative_to(root).as_posix(): q.read_bytes() if q.is_file() else None for q in sorted(root.rglob("*"))}


@pytest.mark.parametrize("entry", ["my_notes.txt", "report", "old_bundle", ".hidden"])
def test_force_replaces_a_bundle_only_when_it_holds_nothing_else(tmp_path, entry):
    """--force replaces a bundle holding the entries a bundle has (and an atomic write's
    leftover temporary file); a file or folder of the user's in it stops the build in one line
    naming it, and nothing is changed."""
    out = tmp_path / "bundle"
    _make(out)
    (out / "engines" / "gpu-sm87-trt10").mkdir(parents=True)
    (out / "engines" / "gpu-sm87-trt10" / "glance.int8.engine").write_bytes(b"e")
    (out / "manifest.json.abc123.tmp").write_text("{")  # an update killed before its rename
    if entry == "report":
        (out / entry).mkdir()
        (out / entry / "report.json").write_text(json.dumps({"format": "gfnet-edge-calibration"}))
    elif entry == "old_bundle":
        _make(out / entry)
    else:
        (out / entry).write_text("mine")
    before = _listing(tmp_path)
    with pytest.raises(BundleError) as e:
        with staging_dir(out, force=True) as tmp:
            _make(tmp, {**MODEL, "model_name": "new"})
    msg = str(e.value)
    assert f"holds {entry}, not part of a gfnet-edge bundle" in msg and "--force" in msg and "\n" not in msg
    assert _listing(tmp_path) == before

    if (out / entry).is_dir():
        shutil.rmtree(out / entry)
    else:
        (out / entry).unlink()
    with staging_dir(out, force=True) as tmp:
        _make(tmp, {**MODEL, "model_name": "new"})
    assert Bundle.load(out).model.model_name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_force_names_the_first_few_foreign_entries(tmp_path):
    from gfnet_edge.bundle import check_replace

    out = tmp_path / "bundle"
    _make(out)
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e\nf.txt"):
        (out / name).write_text("mine")
    with pytest.raises(BundleError, match=r"holds a\.txt, b\.txt, c\.txt and 2 more, not part of") as e:
        check_replace(out, True)
    assert "\n" not in str(e.value)


def test_update_manifest_atomic(tmp_path, monkeypatch):
    import os

    _make(tmp_path / "b")
    b = Bundle.load(tmp_path / "b")
    b.update_manifest(lambda m: m["budgets"].update({"fast": {"thresholds": [0.5, 0.5, -1e8]}}))
    assert "fast" in Bundle.load(tmp_path / "b").budgets()

    # an update that fails where the new manifest is published leaves the old one in place,
    # byte for byte, and no temporary file behind
    def listing():
        return sorted(p.relative_to(b.root).as_posix() for p in b.root.rglob("*"))

    before, files = (b.root / "manifest.json").read_bytes(), listing()
    published = []

    def failing_replace(src, dst):
        published.append(os.path.basename(dst))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(InputError, match=rf"^{re.escape(str(b.root))}: cannot write the bundle's manifest \(No space left"):
        b.update_manifest(lambda m: m["budgets"].update({"slow": {"thresholds": [0.99, 0.99, -1e8]}}))
    monkeypatch.undo()
    assert published == ["manifest.json"]
    assert (b.root / "manifest.json").read_bytes() == before
    assert listing() == files
    assert "slow" not in b.budgets() and "slow" not in Bundle.load(b.root).budgets()


def test_bundle_files_get_plain_modes(tmp_path):
    """Atomic writes start from private temporaries; the published bundle is readable as usual."""
    import os
    import stat

    with staging_dir(tmp_path / "b") as d:
        (d / "x.txt").write_text("x")
        (d / "sub").mkdir()
        write_json_atomic(d / "manifest.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    root = tmp_path / "b"
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((root / "manifest.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((root / "x.txt").stat().st_mode) == 0o666 & ~mask


def _proc_writer(pid):
    """``PID-START-PIDNS-BOOT`` of process ``pid`` as the staging folder names hold it, read from
    /proc here (docs/failure_model.md): start time (clock ticks, /proc/PID/stat field 22), the
    inode of this process's PID namespace, the first 16 hex digits of the boot id."""
    start = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    ns = os.readlink("/proc/self/ns/pid")[len("pid:["):-1]
    boot = open("/proc/sys/kernel/random/boot_id").read().strip().replace("-", "")[:16]
    return pid, start, ns, boot


def _tag(pid, start, ns, boot):
    return f"{pid}-{start}-{ns}-{boot}"


@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="needs Linux /proc")
def test_a_writer_whose_process_name_is_not_ascii_is_still_told_apart():
    """A process renamed to UTF-8 bytes (``prctl(PR_SET_NAME, "trainé")``, or Python run through a
    link named so) keeps the start time its staging folders are judged by."""
    import subprocess

    from gfnet_edge import bundle

    child = subprocess.Popen([PYTHON, "-c", "import ctypes, sys; sys.stdin.readline(); "
                              "ctypes.CDLL(None).prctl(15, 'trainé'.encode()); print('renamed', flush=True); "
                              "sys.stdin.readline()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        before = bundle._start_time(child.pid)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "renamed"
        assert "trainé".encode() in open(f"/proc/{child.pid}/stat", "rb").read()
        assert before is not None and before.isdigit() and bundle._start_time(child.pid) == before
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("name", ["b" * 255, "é" * 127, "b" * 180])
def test_outputs_with_names_up_to_the_file_name_limit_are_staged_and_cleaned(tmp_path, name):
    """An output named with up to 255 bytes is written (its staging folder's name is cut to fit),
    and a killed writer's staging folder for it is removed."""
    from gfnet_edge.bundle import clean_stale, staging_folder

    final = tmp_path / name
    with staging_dir(final) as d:
        (d / "manifest.json").write_text("{}")
    assert json.loads((final / "manifest.json").read_text()) == {}
    left = staging_folder(final)  # as a writer killed before it published would leave it
    assert len(os.fsencode(left.name)) <= 255
    assert clean_stale(final) == []  # this process still runs: kept
    dead = left.with_name(left.name.replace(f".{os.getpid()}-", ".4194305-", 1))  # a process id above pid_max
    os.rename(left, dead)
    assert clean_stale(final) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="needs Linux /proc")
def test_stale_staging_is_removed_only_when_its_writer_is_certainly_gone(tmp_path, caplog):
    """Staging and replaced folders beside a target are removed when their writer has ended
    (its process id free, or now another process's: another start time) in this PID namespace
    and boot; kept silently while it runs; kept with a warning naming the folder when it cannot
    be told (another PID namespace, another boot, a name with a process id alone)."""
    import subprocess

    from gfnet_edge.bundle import clean_stale

    pid, start, ns, boot = me = _proc_writer(os.getpid())
    other_boot = format(int(boot, 16) ^ 1, "016x")
    sleeper = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        running = _tag(*_proc_writer(sleeper.pid))
        names = {
            "gone": [f".out.{_tag(999999999, start, ns, boot)}.abcd1234.partial",  # no such process
                     f".out.{_tag(pid, int(start) + 1, ns, boot)}.abcd1234.partial",  # this id, another process
                     f".out.old-{_tag(999999999, start, ns, boot)}"],
            "running": [f".out.{_tag(*me)}.abcd1234.partial", f".out.{running}.abcd1234.partial",
                        f".out.old-{running}"],
            "unknown": [f".out.{_tag(999999999, start, int(ns) + 1, boot)}.abcd1234.partial",  # another container
                        f".out.{_tag(999999999, start, ns, other_boot)}.abcd1234.partial",  # another machine or boot
                        ".out.999999999.abcd1234.partial", ".out.old-999999999"],  # a process id alone
            "other": [".out2.999999999.abcd1234.partial", f".out2.{_tag(999999999, start, ns, boot)}.x.partial"],
        }
        for name in sum(names.values(), []):
            (tmp_path / name).mkdir()
        with caplog.at_level("WARNING", logger="gfnet_edge"):
            removed = clean_stale(tmp_path / "out")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in removed) == sorted(names["gone"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names["running"] + names["unknown"] + names["other"])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(names["unknown"]), warned
    for name, msg in zip(sorted(names["unknown"]), warned):
        assert msg.startswith(f"{tmp_path / name}: kept") and str(tmp_path / "out") in msg and "\n" not in msg


@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="needs Linux /proc")
def test_staging_of_a_writer_in_another_pid_namespace_is_kept(tmp_path, caplog):
    """A writer in another PID namespace (a container sharing the folder) whose process id is
    free here: its staging folder stays while it writes (a warning names it)."""
    import subprocess

    from gfnet_edge.bundle import clean_stale

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    here = {int(n) for n in os.listdir("/proc") if n.isdigit()}
    if os.getpid() not in here:  # qemu user emulation with a sysroot lists the sysroot's /proc
        pytest.skip("this /proc does not list this system's processes")
    script = f"""
import os, sys, time
sys.path.insert(0, {str(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))!r})
while os.getpid() in {sorted(here)!r}:  # a process id no process has outside this namespace
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        os._exit(0)
from pathlib import Path
from gfnet_edge.bundle import staging_folder
print(staging_folder(Path({str(tmp_path / "out")!r})), flush=True)
sys.stdin.read()
"""
    writer = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", PYTHON, "-c", script],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        staging = writer.stdout.readline().strip()
        if not staging:
            pytest.skip(f"cannot make a PID namespace here: {writer.communicate(timeout=60)[1].strip()[-300:]}")
        pid = int(os.path.basename(staging).split(".")[2].split("-")[0])
        assert not os.path.exists(f"/proc/{pid}")  # its process id is free here
        with caplog.at_level("WARNING", logger="gfnet_edge"):
            assert clean_stale(tmp_path / "out") == []
        assert os.path.isdir(staging) and [r.getMessage().split(":")[0] for r in caplog.records] == [staging]
    finally:
        writer.communicate("", timeout=60)


#: A reader that checks ``sys.argv[1]`` (a bundle's manifest) as fast as it can until
#: ``sys.argv[2]`` exists, then prints how often it found it and how often not.
_POLLER = """
import os, sys
path, stop = sys.argv[1], sys.argv[2]
found = missing = 0
print("polling", flush=True)
while True:
    for _ in range(2000):
        try:
            os.stat(path)
            found += 1
        except FileNotFoundError:
            missing += 1
    if os.path.exists(stop):
        break
print(found, missing)
"""


def _replace_while_polled(tmp_path, times):
    """``--force`` replacements of a bundle, ``times`` times, while another process polls its
    manifest; returns ``(found, missing)``: how often that process found it and how often not."""
    import subprocess

    out, stop = tmp_path / "bundle", tmp_path / "stop"
    _make(out)
    poller = subprocess.Popen([PYTHON, "-c", _POLLER, str(out / "manifest.json"), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert poller.stdout.readline() == "polling\n"
        for i in range(times):
            with staging_dir(out, force=True) as tmp:
                _make(tmp, {**MODEL, "model_name": f"m{i}"})
    finally:
        stop.touch()
        found, missing = map(int, poller.communicate(timeout=60)[0].split())
    assert Bundle.load(out).model.model_name == f"m{times - 1}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "stop"]  # nothing left beside it
    return found, missing


def _libc_swap(a: Path, b: Path) -> bool:
    """The C library's renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE = 2), called here
    (independently of gfnet_edge): whether it swapped ``a`` and ``b``."""
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return False
    return fn is not None and fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0


def _swaps(tmp_path, swap) -> bool:
    """Whether ``swap(a, b)`` swaps two folders here (and says so truly)."""
    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    swapped = swap(a, b)
    assert bool(swapped) == (b / "x").exists() and bool(swapped) != (a / "x").exists()
    shutil.rmtree(a)
    shutil.rmtree(b)
    return bool(swapped)


def test_force_never_leaves_the_bundle_missing_for_a_reader(tmp_path):
    """Where the system swaps two folders in one step (Linux renameat2 RENAME_EXCHANGE), a
    reader polling the bundle while --force replaces it again and again finds it every time."""
    from gfnet_edge.bundle import exchange

    if not _swaps(tmp_path, _libc_swap):
        pytest.skip("this system cannot swap two folders in one step (renameat2 RENAME_EXCHANGE)")
    assert _swaps(tmp_path, exchange)
    found, missing = _replace_while_polled(tmp_path, 300)
    assert found > 0 and missing == 0, (found, missing)


def _unsupported(err):
    """A renameat2 that fails with ``err`` (a filesystem or kernel without RENAME_EXCHANGE)."""
    import ctypes

    def call(old, new, flags):
        ctypes.set_errno(err)
        return -1

    return lambda: call


@pytest.mark.parametrize("renameat2", [lambda: None, _unsupported(errno.EINVAL), _unsupported(errno.ENOSYS)],
                         ids=["no renameat2", "EINVAL", "ENOSYS"])
def test_force_falls_back_to_two_renames(tmp_path, monkeypatch, renameat2):
    """Without renameat2 (another OS), or where the filesystem or kernel refuses RENAME_EXCHANGE,
    --force moves the old bundle aside, renames the new one in and deletes the old one; a second
    rename that fails puts the old bundle back."""
    from gfnet_edge import bundle

    monkeypatch.setattr(bundle, "_renameat2", renameat2)
    assert bundle.exchange(tmp_path, tmp_path) is False
    out = tmp_path / "bundle"
    _make(out)
    with staging_dir(out, force=True) as tmp:
        _make(tmp, {**MODEL, "model_name": "new"})
    assert Bundle.load(out).model.model_name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

    replace = os.replace

    def failing(src, dst):
        if str(src).endswith(".partial"):  # the new bundle into place
            raise OSError(errno.EIO, "Input/output error", str(src))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output"):
        with staging_dir(out, force=True) as tmp:
            _make(tmp, {**MODEL, "model_name": "newer"})
    monkeypatch.setattr(os, "replace", replace)
    assert Bundle.load(out).model.model_name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_exchange_by_the_system_call(tmp_path, monkeypatch):
    """The renameat2 system call made directly (a C library without its wrapper) swaps too."""
    from gfnet_edge import bundle

    call = bundle._renameat2(False)
    if call is None:
        pytest.skip("no renameat2 system call number for this system")
    if not _swaps(tmp_path, _libc_swap):
        pytest.skip("this filesystem cannot swap two folders in one step")
    monkeypatch.setattr(bundle, "_renameat2", lambda: call)
    assert _swaps(tmp_path, bundle.exchange)
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError):
        bundle.exchange(tmp_path / "a", tmp_path / "missing")


def test_exchange_reports_other_failures(tmp_path):
    from gfnet_edge.bundle import exchange

    if not _swaps(tmp_path, _libc_swap):
        pytest.skip("this system cannot swap two folders in one step (renameat2 RENAME_EXCHANGE)")
    assert _swaps(tmp_path, exchange)
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        exchange(tmp_path / "a", tmp_path / "missing")
    assert (e.value.filename, e.value.filename2) == (str(tmp_path / "a"), str(tmp_path / "missing"))
    assert (tmp_path / "a").is_dir()
