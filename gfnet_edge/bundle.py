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
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from . import __version__
from .errors import InputError

FORMAT = "gfnet-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(InputError):
    """A bundle that cannot be used (missing, corrupt, tampered, incompatible)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths and paths that escape ``root``.

    Raises:
        BundleError: the path is unsafe.
    """
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or ":" in rel.split("/")[0]:
        raise BundleError(f"unsafe artifact path in manifest: {rel!r}")
    p = (root / rel).resolve()
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


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
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
        if not mpath.is_file():
            raise BundleError(f"{root}: no {MANIFEST}; not a gfnet-edge bundle (or a half-written one)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath}: corrupt manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not a gfnet-edge manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
        ver = manifest.get("format_version")
        if ver != FORMAT_VERSION:
            raise BundleError(
                f"{mpath}: bundle format version {ver!r}, this gfnet-edge {__version__} reads version {FORMAT_VERSION}; "
                "rebuild the bundle with `gfnet-edge build-engine`"
            )
        for key in ("model", "artifacts", "graphs", "heads"):
            if key not in manifest:
                raise BundleError(f"{mpath}: manifest lacks '{key}'")
        b = cls(root, manifest)
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
    def model(self) -> Dict[str, Any]:
        return self.manifest["model"]

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
        if len(thr) != self.model["steps"]:
            raise BundleError(f"{self.root}: budget {budget!r} has {len(thr)} thresholds for {self.model['steps']} steps")
        return [float(t) for t in thr]

    # ----------------------------------------------------------------- updates
    def update_manifest(self, fn) -> None:
        """Applies ``fn(manifest_copy)`` and writes the result atomically."""
        m = copy.deepcopy(self.manifest)
        fn(m)
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


def record_artifacts(root: Path, manifest: Dict[str, Any]) -> None:
    """Hashes every file under ``root`` (but the manifest) into ``manifest['artifacts']``."""
    arts = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"):
            rel = p.relative_to(root).as_posix()
            arts[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest["artifacts"] = arts


@contextmanager
def staging_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces ``final`` only on success.

    Raises:
        BundleError: ``final`` exists and ``force`` is False.
    """
    final = Path(final)
    if final.exists() and not force:
        raise BundleError(f"{final}: already exists (use --force to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=str(final.parent)))
    try:
        yield tmp
        public_modes(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
