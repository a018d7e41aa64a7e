"""Deployment bundles: a directory with ``manifest.json`` plus graphs, head weights and engines.

Layout::

    BUNDLE/
      manifest.json          format version, model, costs, budgets, artifacts (+ SHA-256), engines
      heads.npz              GRU / Linear head weights for the extension
      graphs/glance.fp32.onnx, graphs/focus.fp32.onnx, graphs/*.int8-<profile>.onnx
      engines/<device>-sm<cc>-trt<ver>[-dla<n>]/*.engine

Bundles are written atomically (built in a sibling temporary directory, then renamed) and
manifest updates replace the file atomically. Loading verifies every artifact's hash, refuses
paths that leave the bundle directory and manifests of an unknown format version.
"""
from __future__ import annotations

import copy
import datetime as _dt
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import __version__
from .errors import InputError, writing
from .log import logger
from .manifest_schema import ManifestError, check_manifest
from .model_desc import ModelDesc

FORMAT = "gfnet-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Largest manifest read (a real one is a few KiB to a few hundred KiB with calibration results).
MAX_MANIFEST_BYTES = 64 << 20


class BundleError(InputError):
    """A bundle that cannot be used (missing, corrupt, tampered, incompatible)."""


def sha256_file(path: Path, chunk: int = 1 << 20, copy_to: Optional[Path] = None) -> str:
    """The SHA-256 of the file at ``path``; with ``copy_to``, its bytes are also written there as
    they are read (one read: the hash is that of the copy)."""
    h = hashlib.sha256()
    with open(path, "rb") as f, (open(copy_to, "wb") if copy_to is not None else nullcontext()) as out:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)
            if out is not None:
                out.write(b)


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths and paths that escape ``root``.

    Raises:
        BundleError: the path is unsafe.
    """
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or ":" in rel.split("/")[0] or "\0" in rel:
        raise BundleError(f"unsafe artifact path in manifest: {rel!r}")
    try:
        p = (root / rel).resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop (RuntimeError before Python 3.13)
        raise BundleError(f"artifact path cannot be resolved (a symbolic link loop?): {rel!r}") from exc
    r = root.resolve()
    if p != r and r not in p.parents:
        raise BundleError(f"artifact path escapes the bundle directory: {rel!r}")
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_modes(root: Path) -> None:
    """Gives ``root`` and everything below it the modes a plain ``open`` / ``mkdir`` would (the
    temporary files and folders atomic writes start from are private, 0600 / 0700)."""
    mask = _umask()
    root = Path(root)
    paths = [root] + list(root.rglob("*")) if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def json_text(obj: Any, **kw: Any) -> str:
    """``obj`` as strict JSON (``NaN`` / ``Infinity`` are not JSON: a non-finite number raises
    :class:`InputError` naming where it is, instead of writing a file other tools cannot read)."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError as exc:
        raise InputError(f"refusing to write non-finite numbers (NaN or infinity) as JSON: {_non_finite(obj)}") from exc


def _non_finite(obj: Any, where: str = "") -> str:
    """The path of the first non-finite float in ``obj`` (for the message of :func:`json_text`)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}.{k}" if isinstance(obj, dict) else f"{where}[{k}]")
        if found:
            return found.lstrip(".")
    return ""


def finite_or_null(o: Any) -> Any:
    """``o`` with every non-finite float (a statistic with no value, e.g. the accuracy of an empty
    set) replaced by None, for reports that must be strict JSON (``null``, never a bare ``NaN``)."""
    if isinstance(o, dict):
        return {k: finite_or_null(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_or_null(v) for v in o]
    if hasattr(o, "tolist") and not isinstance(o, (int, float)):  # numpy arrays and scalars
        return finite_or_null(o.tolist())
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    return o


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes strict JSON (:func:`json_text`) to ``path`` through a temporary file and a rename."""
    write_text_atomic(path, json_text(obj, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through a temporary file beside it and a rename: an
    interrupted or failed write leaves ``path`` as it was."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file beside it and a rename (a plain file's
    mode): an interrupted or failed write leaves ``path`` as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        public_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class Bundle:
    """A loaded bundle.

    Attributes:
        root: the bundle directory.
        manifest: the parsed ``manifest.json``.
    """

    root: Path
    manifest: Dict[str, Any]
    _desc: Optional[ModelDesc] = field(default=None, init=False, repr=False, compare=False)
    _desc_src: Any = field(default=None, init=False, repr=False, compare=False)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, root: os.PathLike | str, verify: bool = True) -> "Bundle":
        """Reads and checks a bundle.

        Args:
            root: bundle directory.
            verify: check SHA-256 of every artifact.

        Raises:
            BundleError: missing directory/manifest, bad JSON, unknown format or version,
                unsafe paths, missing or modified artifacts.
        """
        root = Path(root)
        if not root.exists():
            raise BundleError(f"{root}: bundle not found")
        if not root.is_dir():
            raise BundleError(f"{root}: a bundle is a directory (did you pass a checkpoint or a file?)")
        mpath = root / MANIFEST
        checkpoint = root / "gfnet.pth.tar"
        if not mpath.is_file() and (checkpoint.is_file() or (root / "data_index.json").is_file()):
            raise BundleError(f"{root}: a gfnet-edge train run folder, not a bundle: `gfnet-edge build-engine "
                              f"{checkpoint} -o BUNDLE` builds one from its checkpoint"
                              + ("" if checkpoint.is_file() else " (which the run writes at its end)"))
        if not mpath.is_file():
            raise BundleError(f"{root}: no {MANIFEST}; not a gfnet-edge bundle (or a half-written one)")
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mpath}: {size / 2 ** 20:.0f} MiB; a manifest is at most "
                              f"{MAX_MANIFEST_BYTES >> 20} MiB (not a gfnet-edge manifest)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, integers too long, nesting too deep
            raise BundleError(f"{mpath}: corrupt manifest ({str(exc)[:200]})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not a gfnet-edge manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
        ver = manifest.get("format_version")
        if ver != FORMAT_VERSION:
            raise BundleError(
                f"{mpath}: bundle format version {ver!r}, this gfnet-edge {__version__} reads version {FORMAT_VERSION}; "
                "rebuild the bundle with `gfnet-edge build-engine`"
            )
        try:
            check_manifest(manifest)
        except ManifestError as exc:
            raise BundleError(f"{mpath}: {exc}") from exc
        b = cls(root, manifest)
        b._desc, b._desc_src = ModelDesc.from_manifest(manifest["model"], checked=True), manifest["model"]
        for rel in manifest["artifacts"]:
            safe_join(root, rel)
        if verify:
            b.verify()
        return b

    def verify(self, names: Optional[List[str]] = None) -> None:
        """Checks the listed artifacts (all by default) against their recorded SHA-256."""
        arts = self.manifest["artifacts"]
        for rel in names if names is not None else list(arts):
            if rel not in arts:
                raise BundleError(f"{self.root}: artifact {rel!r} is not listed in the manifest")
            p = safe_join(self.root, rel)
            if not p.is_file():
                raise BundleError(f"{self.root}: artifact {rel} is missing")
            digest = sha256_file(p)
            if digest != arts[rel]["sha256"]:
                raise BundleError(
                    f"{self.root}: artifact {rel} was modified or corrupted (SHA-256 {digest[:12]}… != manifest {arts[rel]['sha256'][:12]}…); rebuild the bundle"
                )

    def path(self, rel: str) -> Path:
        if rel not in self.manifest["artifacts"]:
            raise BundleError(f"{self.root}: artifact {rel!r} is not listed in the manifest")
        return safe_join(self.root, rel)

    # --------------------------------------------------------------- accessors
    @property
    def model(self) -> ModelDesc:
        """The model description (parsed once from the manifest's ``model`` entry)."""
        m = self.manifest["model"]
        if self._desc is None or self._desc_src is not m:
            self._desc, self._desc_src = ModelDesc.from_manifest(m), m
        return self._desc

    def graph_paths(self, precision: str) -> Dict[str, Path]:
        """``{"glance": path, "focus": path}`` for a graph set (``fp32``, ``int8-cpu`` ...)."""
        graphs = self.manifest["graphs"]
        if precision not in graphs:
            raise BundleError(f"{self.root}: no '{precision}' graphs in this bundle (has: {', '.join(graphs) or 'none'})")
        return {k: self.path(v) for k, v in graphs[precision].items()}

    @property
    def heads_path(self) -> Path:
        return self.path(self.manifest["heads"])

    def budgets(self) -> Dict[str, Dict[str, Any]]:
        return dict(self.manifest.get("budgets", {}))

    def thresholds(self, budget: Optional[str]) -> Optional[List[float]]:
        """Thresholds of a named budget (``None``: the default budget, or no early exit)."""
        budgets = self.budgets()
        if budget is None:
            budget = self.manifest.get("default_budget")
            if budget is None:
                return None
        if budget not in budgets:
            raise BundleError(f"{self.root}: no budget named {budget!r} (has: {', '.join(budgets) or 'none'})")
        thr = budgets[budget]["thresholds"]
        if len(thr) != self.model.steps:
            raise BundleError(f"{self.root}: budget {budget!r} has {len(thr)} thresholds for {self.model.steps} steps")
        return [float(t) for t in thr]

    # ----------------------------------------------------------------- updates
    def update_manifest(self, fn) -> None:
        """Applies ``fn(manifest_copy)`` and writes the result atomically."""
        m = copy.deepcopy(self.manifest)
        fn(m)
        with writing(self.root, "the bundle's manifest"):
            write_json_atomic(self.root / MANIFEST, m)
        self.manifest = m

    def add_artifact(self, manifest: Dict[str, Any], rel: str) -> None:
        p = safe_join(self.root, rel)
        manifest["artifacts"][rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}


def new_manifest(model: Dict[str, Any], costs: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"gfnet-edge {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "costs": costs,
        "budgets": {},
        "default_budget": None,
        "artifacts": {},
        "graphs": {},
        "heads": "heads.npz",
        "engines": [],
    }


def record_artifacts(root: Path, manifest: Dict[str, Any], hashed: Optional[Dict[str, str]] = None) -> None:
    """Hashes every file under ``root`` (but the manifest) into ``manifest['artifacts']``;
    ``hashed``: the SHA-256 of files already hashed as they were written, by relative path."""
    hashed = hashed or {}
    arts = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"):
            rel = p.relative_to(root).as_posix()
            arts[rel] = {"sha256": hashed[rel] if rel in hashed else sha256_file(p), "bytes": p.stat().st_size}
    manifest["artifacts"] = arts


def is_bundle_dir(path: Path) -> bool:
    """True for a directory whose ``manifest.json`` says it is a gfnet-edge bundle."""
    return _json_format(Path(path) / MANIFEST) == FORMAT


def json_object(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON object of a small file (at most 64 MiB), or None (missing, not a regular file,
    unreadable, not JSON, not an object)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _json_format(path: Path) -> Optional[str]:
    """The ``format`` field of a small JSON file, or None (missing, unreadable, not JSON)."""
    data = json_object(path)
    return None if data is None else data.get("format")


def replaceable(final: Path, marker: str = MANIFEST, fmt: str = FORMAT) -> bool:
    """Whether ``--force`` may replace ``final``: an empty directory, or one whose ``marker``
    JSON file says ``"format": fmt`` (what gfnet-edge wrote there itself)."""
    if final.is_symlink() or not final.is_dir():
        return False
    return not any(final.iterdir()) or _json_format(final / marker) == fmt


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _read(path: str) -> bytes:
    """The bytes of a small file (``b""`` when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _start_time(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks after boot, ``/proc/PID/stat`` field 22), or
    None (no such process, no ``/proc``). The command name before it may hold any bytes."""
    fields = _read(f"/proc/{pid}/stat").rsplit(b")", 1)[-1].split()  # after the command name, field 3 on
    return fields[19].decode("ascii") if len(fields) > 19 and fields[19].isdigit() else None


def _host_ids() -> Optional[Tuple[str, str]]:
    """``(PID namespace, boot)`` of this process: the inode of ``/proc/self/ns/pid`` and the
    first 16 hex digits of ``/proc/sys/kernel/random/boot_id``; None where there are none."""
    try:
        ns = re.fullmatch(r"pid:\[(\d+)\]", os.readlink("/proc/self/ns/pid"))
    except OSError:
        return None
    boot = _read("/proc/sys/kernel/random/boot_id").decode("ascii", "replace").strip().replace("-", "").lower()[:16]
    if ns is None or not re.fullmatch(r"[0-9a-f]{16}", boot):
        return None
    return ns.group(1), boot


def writer_tag() -> str:
    """This process in the names of its staging folders: ``PID-START-PIDNS-BOOT`` (process id,
    start time, PID namespace, boot; :func:`clean_stale` reads them), or the process id alone
    where ``/proc`` does not give the others."""
    ids, start = _host_ids(), _start_time(os.getpid())
    return str(os.getpid()) if ids is None or start is None else "-".join((str(os.getpid()), start, *ids))


def _writer_gone(tag: str) -> Tuple[Optional[bool], str]:
    """Whether the writer ``tag`` (:func:`writer_tag`) has ended: True or False when that is
    certain, else None with the reason it cannot be told."""
    pid, *ids = tag.split("-")
    if not ids:
        return None, "its name holds a process id alone, which does not tell a process of another container"
    start, ns, boot = ids
    here = _host_ids()
    if here is None:
        return None, "this system does not tell process start times, PID namespaces and boots apart"
    if boot != here[1]:
        return None, "it was written on another machine or before this one restarted"
    if ns != here[0]:
        return None, "it was written in another PID namespace (another container)"
    if not _pid_alive(int(pid)):
        return True, ""
    now = _start_time(int(pid))
    if now is None:
        return None, f"process {pid} runs and its start time cannot be read"
    return now != start, ""  # another start time: the process id was given to a new process


def clean_stale(final: Path) -> List[Path]:
    """Removes the staging (``.NAME.WRITER.XXXX.partial``) and replaced (``.NAME.old-WRITER``)
    folders that outputs to ``final`` killed with SIGKILL left, when their
    writer (:func:`writer_tag`) is certainly gone: ended, or its process id now another process's.
    A folder whose writer cannot be told (written on another machine, before a restart, in another
    container's PID namespace, or named with a process id alone) is left, with a warning naming
    it. Returns what was removed."""
    tag = r"(\d+(?:-\d+-\d+-[0-9a-f]{16})?)"
    pattern = re.compile(rf"^\.{re.escape(_stem(final))}\.(?:{tag}\.[A-Za-z0-9_]+\.partial|old-{tag})$")
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for p in sorted(siblings):
        match = pattern.match(p.name)
        if match is None or p.is_symlink() or not p.is_dir():
            continue
        gone, why = _writer_gone(match.group(1) or match.group(2))
        if gone:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif gone is None:
            logger.warning("%s: kept: the staging folder of an output to %s whose writer may still be running "
                           "(%s); delete it once no gfnet-edge writes %s", p, final, why, final)
    return removed


#: The entries of a bundle folder (docs/bundle_format.md): ``--force`` replaces a bundle only
#: when it holds nothing else (a user's notes, a calibration report written into it, another bundle).
BUNDLE_ENTRIES = (MANIFEST, "heads.npz", "graphs", "engines", "checkpoint.pth.tar")


def foreign_entries(final: Path, owned: Sequence[str]) -> List[str]:
    """The names in the folder ``final`` that are not among ``owned`` (sorted); the temporary
    files an atomic write of an owned file leaves when killed (``NAME.XXXX.tmp``) count as owned."""
    def is_owned(name: str) -> bool:
        return name in owned or (name.endswith(".tmp") and any(name.startswith(o + ".") for o in owned))

    return sorted(p.name for p in Path(final).iterdir() if not is_owned(p.name))


def _names(names: Sequence[str], show: int = 3) -> str:
    """``a, b, c and 2 more`` (names with control characters as Python literals: one line)."""
    shown = [n if n.isprintable() else repr(n) for n in names[:show]]
    return ", ".join(shown) + (f" and {len(names) - show} more" if len(names) > show else "")


def check_replace(final: Path, force: bool, marker: str = MANIFEST, fmt: str = FORMAT,
                  what: str = "gfnet-edge bundle", protect: Sequence[Path] = (),
                  owned: Sequence[str] = BUNDLE_ENTRIES, replacer: str = "--force",
                  advice: str = "choose another path") -> None:
    """Refuses to replace anything but an earlier output of the same kind (or an empty folder),
    and an output that cannot be made because something on its path is not a folder.

    An earlier output may be replaced only when it holds none of ``protect`` (the command's
    inputs), not the current directory, and no entry but ``owned`` (the names that output kind
    writes). ``replacer`` (``--force``, ``the demo``) and ``advice`` word the refusals."""
    final = Path(final)
    if not (final.exists() or final.is_symlink()):
        blocked = next((p for p in final.parents if p.exists() or p.is_symlink()), None)
        if blocked is not None and not blocked.is_dir():
            raise BundleError(f"{final}: {blocked} is not a folder")
        return
    if not force:
        raise BundleError(f"{final}: already exists (use --force to replace it)")
    only = f"{replacer} replaces only a {what} or an empty directory"
    if final.is_symlink() or not final.is_dir():
        raise BundleError(f"{final}: exists and is not a directory; {only}: {advice}")
    if not replaceable(final, marker, fmt):
        raise BundleError(f"{final}: exists and is not a {what} (no {marker} of format {fmt!r}); {only}: {advice}")
    here = final.resolve()
    for p in protect:
        q = Path(p).resolve()
        if q == here or here in q.parents:
            raise BundleError(f"{final}: holds {p}, an input of this command; {replacer} will not delete it")
    cwd = Path.cwd().resolve()
    if cwd == here or here in cwd.parents:
        raise BundleError(f"{final}: is the current directory or holds it; {replacer} will not delete it")
    foreign = foreign_entries(final, owned)
    if foreign:
        raise BundleError(f"{final}: holds {_names(foreign)}, not part of a {what}; {only}: move them out or "
                          f"{advice}")


def staging_folder(final: Path) -> Path:
    """A new empty folder beside ``final`` named ``.NAME.WRITER.XXXX.partial`` (WRITER:
    :func:`writer_tag`), after removing those that killed runs to ``final`` left
    (:func:`clean_stale`).

    Raises:
        BundleError: nothing can be written beside ``final``.
    """
    clean_stale(final)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{_stem(final)}.{writer_tag()}.", suffix=".partial", dir=str(final.parent)))
    except OSError as exc:
        raise BundleError(f"{final}: cannot write next to it ({exc.strerror or exc})") from exc


#: Bytes of ``final``'s name that the names of its staging and replaced folders
#: (``.NAME.WRITER.XXXXXXXX.partial``, ``.NAME.old-WRITER``) start with: a file name has at most
#: 255 bytes, and a writer tag up to 56 (:func:`writer_tag`).
_STEM_BYTES = 255 - 75


def _stem(final: Path) -> str:
    """``final``'s name as its staging and replaced folders start with it: cut to
    :data:`_STEM_BYTES` bytes, so that an output whose name is up to 255 bytes long can be staged
    (outputs whose names share their first bytes share stems; :func:`clean_stale` removes only
    folders whose writers are gone, whichever output they were for)."""
    name = os.fsencode(final.name)
    return final.name if len(name) <= _STEM_BYTES else os.fsdecode(name[:_STEM_BYTES])


#: ``renameat2`` flag: swap the two paths (Linux 3.15 on; ext4, XFS, Btrfs, tmpfs, overlayfs ...).
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: The ``renameat2`` system call's number by (kernel machine, bits of this process), for a C
#: library without its wrapper (glibc before 2.28); a 32-bit process on a 64-bit kernel uses the
#: 32-bit numbers.
_SYS_RENAMEAT2 = {("x86_64", 64): 316, ("x86_64", 32): 353, ("aarch64", 64): 276, ("riscv64", 64): 276, ("ppc64le", 64): 357,
                  ("s390x", 64): 347, ("i686", 32): 353, ("i386", 32): 353, ("armv7l", 32): 382,
                  ("armv8l", 32): 382, ("aarch64", 32): 382}


@functools.lru_cache(maxsize=None)
def _renameat2(wrapper: bool = True) -> Optional[Callable[[bytes, bytes, int], int]]:
    """``renameat2(old, new, flags)`` relative to the current directory (0, or -1 with errno),
    from the C library (unless ``wrapper`` is False) or as a system call; None where there is
    neither (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import platform

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None) if wrapper else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda old, new, flags: fn(_AT_FDCWD, old, _AT_FDCWD, new, flags)
    number = _SYS_RENAMEAT2.get((platform.machine(), 8 * ctypes.sizeof(ctypes.c_void_p)))
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return lambda old, new, flags: syscall(ctypes.c_long(number), ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(old),
                                           ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(new), ctypes.c_long(flags))


def exchange(a: Path, b: Path) -> bool:
    """Swaps the existing paths ``a`` and ``b`` in one step (``renameat2`` with
    :data:`RENAME_EXCHANGE`), so that neither is ever missing; False, with nothing changed, where
    the system cannot (not Linux, a kernel before 3.15, a filesystem without it, a sandbox that
    refuses the call).

    Raises:
        OSError: the swap failed otherwise (a path missing, no permission ...).
    """
    import ctypes

    call = _renameat2()
    if call is None:
        return False
    if call(os.fsencode(a), os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_folder(new: Path, final: Path) -> Optional[Path]:
    """Puts the folder ``new`` at ``final``; returns the path the earlier ``final`` folder is now
    at, for the caller to delete (None when there was none).

    An existing ``final`` is swapped with ``new`` in one step where the system can
    (:func:`exchange`): a reader opening ``final`` meanwhile finds the old folder or the new one,
    never none; the old one is then at ``new``. Elsewhere it is moved aside to
    ``.NAME.old-WRITER`` and ``new`` renamed in, and for that moment ``final`` does not exist (it
    is moved back if the second rename fails)."""
    if not final.exists():
        os.replace(new, final)
        return None
    if exchange(new, final):
        return new
    old = final.with_name(f".{_stem(final)}.old-{writer_tag()}")
    os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    return old


@contextmanager
def staging_dir(final: Path, force: bool = False, marker: str = MANIFEST, fmt: str = FORMAT,
                what: str = "gfnet-edge bundle", protect: Sequence[Path] = (),
                owned: Sequence[str] = BUNDLE_ENTRIES) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces ``final`` only on success (an existing
    ``final`` in one step where the system can, :func:`replace_folder`).

    With ``force``, an existing ``final`` is replaced only when it is an empty directory or an
    earlier output of the same kind (its ``marker`` JSON says ``"format": fmt``) that holds none
    of ``protect`` (the command's inputs) and no entry but ``owned`` (:func:`check_replace`).
    Staging folders left by killed builds to the same target are removed first
    (:func:`clean_stale`). An exception (KeyboardInterrupt, or the
    CLI's SIGTERM handler included) removes the staging folder and the parent folders made for
    ``final``, and leaves ``final`` as it was.

    Raises:
        BundleError: ``final`` exists and may not be replaced.
        InputError: the file system refuses a write that names no file (a full disk: "FINAL:
            cannot write the WHAT (No space left on device)", :func:`gfnet_edge.errors.writing`).
    """
    final = Path(final)
    check_replace(final, force, marker, fmt, what, protect, owned)
    made = [p for p in final.parents if not (p.exists() or p.is_symlink())]  # the folders made here, deepest first
    done = False
    try:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BundleError(f"{final}: cannot create the parent directory ({exc.strerror or exc})") from exc
        tmp = staging_folder(final)
        try:
            with writing(final, f"the {what}"):
                yield tmp
                public_modes(tmp)
                old = replace_folder(tmp, final)
            done = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        for p in made if not done else ():  # a failed output leaves no empty parent folders behind
            try:
                p.rmdir()
            except OSError:
                break
