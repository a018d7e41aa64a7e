"""Measures the shipped demo GFNet and its static baseline on the cluttered-digits splits.

``python -m gfnet_edge.train.demo_results`` recomputes every number of
``gfnet_edge/assets/demo_results.json`` from the shipped checkpoints: anytime accuracy per step
(learned policy, random patches, centre patch), the static baseline, and the budgeted curve
(thresholds fit on val, costs = the checkpoint's cumulative multiply-adds). It prints the table
on stdout; ``--json PATH`` also writes the results as JSON. The shipped
``demo_results.json`` is replaced only with ``--update-shipped``, which measures the checkpoints
in the package's assets on the documented splits (500 val, 1000 test images).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .. import evaluate as ev
from ..models.checkpoint import load_checkpoint
from ..models.gfnet import GFNet
from .data import Split, load_split, to_tensor
from .static import load_static

ASSETS = Path(__file__).resolve().parent.parent / "assets"
GFNET_PATH = ASSETS / "demo_gfnet.pth.tar"
STATIC_PATH = ASSETS / "demo_static.pth.tar"
RESULTS_PATH = ASSETS / "demo_results.json"
#: ``test500_anytime_accuracy``: the anytime accuracy on the first this many test images.
TEST500 = 500


@torch.no_grad()
def gfnet_probs(model: GFNet, split: Split, override: Optional[str] = None, seed: int = 0, batch: int = 100,
                progress: bool = False) -> np.ndarray:
    """Step probabilities (T, N, K) of ``model`` on ``split``.

    Args:
        override: ``None`` (the learned policy), ``"random"`` (uniform random patch corners,
            seeded) or ``"centre"`` (the centre patch at every step).
    """
    model.eval()
    S, P, T = model.spec.image_size, model.spec.patch_size, model.spec.steps
    n = len(split)
    rng = np.random.default_rng(seed)
    rand = rng.integers(0, S - P + 1, size=(T - 1, n, 2))
    out = []
    rng_range = range(0, n, batch)
    if progress:
        from tqdm.auto import tqdm

        rng_range = tqdm(rng_range, desc=f"gfnet {override or 'policy'}", mininterval=5.0, leave=False)
    for i in rng_range:
        x = to_tensor(split.frames[i:i + batch])
        m = x.shape[0]
        coords = None
        if override == "random":
            coords = torch.from_numpy(rand[:, i:i + m]).to(torch.int32)
        elif override == "centre":
            coords = torch.full((T - 1, m, 2), (S - P) // 2, dtype=torch.int32)
        elif override is not None:
            raise ValueError(f"override must be None, 'random' or 'centre', got {override!r}")
        out.append(model.trace(x, coords_override=coords).probs.numpy())
    return np.concatenate(out, axis=1)


@torch.no_grad()
def static_probs(net: torch.nn.Module, split: Split, batch: int = 50) -> np.ndarray:
    """Softmax outputs (N, K) of the static baseline on full images."""
    net.eval()
    out = [torch.softmax(net(to_tensor(split.frames[i:i + batch])), 1).numpy() for i in range(0, len(split), batch)]
    return np.concatenate(out)


def measure(model: GFNet, static_net: torch.nn.Module, static_macs: float, val: Split, test: Split,
            seed: int = 0, progress: bool = False, log=print) -> Dict[str, Any]:
    """All demo numbers. Returns a JSON-ready dict (accuracies in percent)."""
    t0 = time.time()
    costs = [float(c) for c in model.meta["flops"]] if getattr(model, "meta", None) and model.meta.get("flops") else None
    if costs is None:
        from ..models.macs import count_step_macs

        costs = [float(c) for c in count_step_macs(model).cumulative]
    test_p = gfnet_probs(model, test, None, seed, progress=progress)
    log(f"  policy on test: {time.time() - t0:.0f} s")
    val_p = gfnet_probs(model, val, None, seed, progress=progress)
    rand_p = gfnet_probs(model, test, "random", seed, progress=progress)
    cent_p = gfnet_probs(model, test, "centre", seed, progress=progress)
    log(f"  gfnet variants: {time.time() - t0:.0f} s")
    s_p = static_probs(static_net, test)
    log(f"  static: {time.time() - t0:.0f} s")
    y = test.labels
    anytime = ev.anytime_accuracy(test_p, y)
    anytime_rand = ev.anytime_accuracy(rand_p, y)
    anytime_cent = ev.anytime_accuracy(cent_p, y)
    static_acc = float((s_p.argmax(1) == y).mean() * 100)
    curve = ev.budgeted_curve(val_p, test_p, y, costs)
    target = static_acc - 0.5
    reach = [(c, a) for c, a in zip(curve.cost, curve.accuracy) if a >= target]
    cheapest = min(reach) if reach else None
    large = test.large.astype(bool)
    pred = test_p.argmax(2)
    res: Dict[str, Any] = {
        "test_images": int(len(test)), "val_images": int(len(val)),
        "step_macs_cumulative": costs,
        "static_macs": float(static_macs),
        "anytime_accuracy": [round(float(a), 2) for a in anytime],
        "anytime_accuracy_random_patches": [round(float(a), 2) for a in anytime_rand],
        "anytime_accuracy_centre_patch": [round(float(a), 2) for a in anytime_cent],
        "anytime_accuracy_large_digits": [round(float(a), 2) for a in (pred[:, large] == y[large]).mean(1) * 100],
        "anytime_accuracy_small_digits": [round(float(a), 2) for a in (pred[:, ~large] == y[~large]).mean(1) * 100],
        "static_accuracy": round(static_acc, 2),
        "policy_gain_over_random": round(float(anytime[-1] - anytime_rand[-1]), 2),
        "policy_gain_over_centre": round(float(anytime[-1] - anytime_cent[-1]), 2),
        "final_minus_glance": round(float(anytime[-1] - anytime[0]), 2),
        "budgeted_batch_classification": [[float(c) for c in curve.cost], [float(a) for a in curve.accuracy]],
        "budgeted_ps": [float(p) for p in curve.ps],
        "dynamic_threshold": [[float(t) for t in row] for row in curve.thresholds],
        "reaches_static_within_0.5": cheapest is not None,
        "cheapest_macs_reaching_static": float(cheapest[0]) if cheapest else None,
        "accuracy_at_that_point": float(cheapest[1]) if cheapest else None,
        "fraction_of_static_macs": round(float(cheapest[0] / static_macs), 4) if cheapest else None,
        "eval_seconds": round(time.time() - t0, 1),
    }
    if len(test) >= TEST500:  # the figures tests/test_demo_model.py checks the shipped checkpoint against
        res["test500_anytime_accuracy"] = [round(float(a), 2) for a in ev.anytime_accuracy(test_p[:, :TEST500], y[:TEST500])]
    res["targets"] = check_targets(res)
    return res


def check_targets(r: Dict[str, Any]) -> Dict[str, bool]:
    """The demo model's targets, each True/False."""
    a = r["anytime_accuracy"]
    return {
        "final_step_>=90": a[-1] >= 90.0,
        "final_>=_glance+15": a[-1] >= a[0] + 15.0,
        "glance_<=80": a[0] <= 80.0,
        "static_>=90": r["static_accuracy"] >= 90.0,
        "policy_beats_random_by_3": r["policy_gain_over_random"] >= 3.0,
        "policy_beats_centre_by_3": r["policy_gain_over_centre"] >= 3.0,
        "budget_reaches_static_at_<=50%_macs": bool(r["fraction_of_static_macs"] is not None and r["fraction_of_static_macs"] <= 0.5),
    }


def table(r: Dict[str, Any]) -> str:
    """Human-readable summary of :func:`measure`'s result."""
    f = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    rows = [
        ("test images", str(r["test_images"])),
        ("anytime acc, policy (%)", f(r["anytime_accuracy"])),
        ("anytime acc, random patches", f(r["anytime_accuracy_random_patches"])),
        ("anytime acc, centre patch", f(r["anytime_accuracy_centre_patch"])),
        ("  large digits", f(r["anytime_accuracy_large_digits"])),
        ("  small digits", f(r["anytime_accuracy_small_digits"])),
        ("static baseline acc (%)", f"{r['static_accuracy']:.2f}"),
        ("cumulative MACs per step", " / ".join(f"{c / 1e6:.1f}M" for c in r["step_macs_cumulative"])),
        ("static MACs", f"{r['static_macs'] / 1e6:.1f}M"),
        ("policy - random (final)", f"{r['policy_gain_over_random']:+.2f}"),
        ("policy - centre (final)", f"{r['policy_gain_over_centre']:+.2f}"),
        ("budgeted: static acc - 0.5 at",
         "not reached" if not r["reaches_static_within_0.5"] else
         f"{r['cheapest_macs_reaching_static'] / 1e6:.1f}M MACs = "
         f"{100 * r['cheapest_macs_reaching_static'] / r['static_macs']:.1f}% of static "
         f"(acc {r['accuracy_at_that_point']:.2f})"),
    ]
    w = max(len(a) for a, _ in rows)
    lines = [f"{a:<{w}}  {b}" for a, b in rows]
    lines.append("targets: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in r["targets"].items()))
    return "\n".join(lines)


#: The split sizes the shipped ``demo_results.json`` is measured on (``--update-shipped``).
SHIPPED_VAL_SIZE, SHIPPED_TEST_SIZE = 500, 1000


def _in_assets(path: Path) -> bool:
    """Whether ``path`` lies in the package's assets folder (the shipped files)."""
    try:
        path.resolve().relative_to(ASSETS.resolve())
        return True
    except ValueError:
        return False


def _check_output(args: argparse.Namespace) -> Optional[Path]:
    """The file the results go to (``None``: printed only); raises ``InputError`` when it would
    replace a shipped file other than through ``--update-shipped`` with the shipped checkpoints
    and splits."""
    from ..errors import InputError

    if not args.update_shipped:
        if args.json and _in_assets(Path(args.json)):
            raise InputError(f"--json {args.json}: refusing to write into the package's assets ({ASSETS}); "
                             "--update-shipped replaces the shipped demo_results.json")
        if args.json and not Path(args.json).resolve().parent.is_dir():  # before the measurement, not after
            raise InputError(f"--json {args.json}: no such folder {Path(args.json).parent}")
        return Path(args.json) if args.json else None
    if args.json:
        raise InputError("--update-shipped writes the shipped demo_results.json: give it without --json")
    for opt, given, shipped in (("--gfnet", args.gfnet, GFNET_PATH), ("--static", args.static, STATIC_PATH)):
        if Path(given).resolve() != shipped.resolve():
            raise InputError(f"--update-shipped measures the shipped checkpoints: {opt} must be {shipped}, got {given}")
    for opt, given, shipped in (("--val-size", args.val_size, SHIPPED_VAL_SIZE),
                                ("--test-size", args.test_size, SHIPPED_TEST_SIZE)):
        if given != shipped:
            raise InputError(f"--update-shipped measures on the shipped splits: {opt} must be {shipped}, got {given}")
    return RESULTS_PATH


def main(argv: Optional[List[str]] = None) -> int:
    from ..argtypes import NON_NEGATIVE, POSITIVE, THREADS
    from ..cli import _exit_code, _Parser  # one-line errors, exit 2 for bad options
    from ..errors import GFNetEdgeError

    ap = _Parser(prog="python -m gfnet_edge.train.demo_results", description=__doc__.splitlines()[0])
    ap.add_argument("--gfnet", default=str(GFNET_PATH), help="GFNet checkpoint (default: the shipped demo)")
    ap.add_argument("--static", default=str(STATIC_PATH), help="static baseline checkpoint (default: the shipped one)")
    ap.add_argument("--val-size", type=POSITIVE, default=SHIPPED_VAL_SIZE,
                    help="validation images the exit thresholds are fit on (default %(default)s)")
    ap.add_argument("--test-size", type=POSITIVE, default=SHIPPED_TEST_SIZE,
                    help="test images measured (default %(default)s)")
    ap.add_argument("--threads", type=THREADS, default=2, help="torch CPU threads (default %(default)s)")
    ap.add_argument("--seed", type=NON_NEGATIVE, default=0,
                    help="seed of the random-patch comparison (default %(default)s)")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help="also write the results as JSON to PATH (default: print the table only); "
                         "never into the package's assets")
    ap.add_argument("--update-shipped", action="store_true",
                    help=f"replace the shipped {RESULTS_PATH.name} in the package's assets; requires the shipped "
                         f"checkpoints and the default --val-size / --test-size")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (GFNetEdgeError, OSError) as exc:  # bad input, a file that cannot be read or written (2): one line
        if isinstance(exc, OSError) and exc.filename is None:
            raise
        return _exit_code(exc, "demo_results")


def _run(args: argparse.Namespace) -> int:
    out = _check_output(args)
    torch.set_num_threads(args.threads)
    from ..errors import InputError
    from ..models.checkpoint import CheckpointError, read_checkpoint_dict

    try:
        model = load_checkpoint(args.gfnet)
        static_net, smeta = load_static(args.static)
    except CheckpointError as exc:
        raise InputError(str(exc)) from exc
    from .config import data_config_from_dict

    stored = read_checkpoint_dict(args.gfnet).get("demo_data", {}).get("config")
    dcfg = data_config_from_dict(stored) if stored else None  # the generator config the model was trained on
    val = load_split("val", args.val_size, config=dcfg)
    test = load_split("test", args.test_size, config=dcfg)
    res = measure(model, static_net, smeta["macs"], val, test, seed=args.seed, progress=sys.stderr.isatty())
    res["gfnet_checkpoint"] = Path(args.gfnet).name
    res["static_checkpoint"] = Path(args.static).name
    if args.update_shipped and RESULTS_PATH.exists():  # the training record of the shipped checkpoint stays
        previous = json.loads(RESULTS_PATH.read_text())
        if "training_minutes" in previous:
            res["training_minutes"] = previous["training_minutes"]
    print(table(res))
    if out is not None:
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
