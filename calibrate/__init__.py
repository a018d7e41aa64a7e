"""Latency/accuracy calibration of GFNet bundles (``gfnet_edge.calibrate``).

Measures each step's latency on this device with the real runtime, fits exit thresholds for
budgets in milliseconds (on the mean or on a percentile of per-image latency), verifies them by
running the runtime, writes them into the bundle's manifest as named budgets and writes a report
(``report.json`` + self-contained ``report.html``).

Example::

    from gfnet_edge.calibrate import CalibrationConfig, run_calibration
    res = run_calibration(CalibrationConfig(bundle="bundle/", data="demo", output="report/",
                                            budgets_ms=[3.0, 4.0, 5.0]))

Importing this package needs numpy only; the runtime, matplotlib and torch load when used.
"""
from __future__ import annotations

from .budgets import Budget, BudgetKind
from .fit import BudgetFit, InfeasibleBudget, budget_name, check_feasible, default_budgets, fit_budget
from .tail import fit_tail_budget

__all__ = ["Budget", "BudgetFit", "BudgetKind", "CalibrationConfig", "InfeasibleBudget", "budget_name",
           "check_feasible", "default_budgets", "fit_budget", "fit_tail_budget", "run_calibration"]


def __getattr__(name: str):
    if name in ("CalibrationConfig", "run_calibration"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'gfnet_edge.calibrate' has no attribute {name!r}")
