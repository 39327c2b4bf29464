"""Metric modules for `evaluate`, shipped with the package because `evaluate.load("accuracy")` needs the Hub.

Each folder holds one `evaluate.Metric` script named after it; `load_metric(name)` loads it by path, which works
offline. They are plain enough to read: counts of true/false positives, longest common subsequences.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    path = METRICS / name
    if not (path / f"{name}.py").is_file():
        known = sorted(p.name for p in METRICS.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {', '.join(known)}")
    return path


def load_metric(name: str) -> evaluate.EvaluationModule:
    return evaluate.load(str(metric_path(name)))
