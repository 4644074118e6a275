"""Speed and memory measured side by side (`python -m benchmarks.NAME`); small JSON summaries go to
benchmarks/results/, committed so the README can quote them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from topoflow.files import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def save_result(name: str, result: dict[str, Any]) -> Path:
    """Write benchmarks/results/NAME.json (atomically, keys in the benchmark's order) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, result, sort_keys=False)
    print(f"wrote {path}")
    return path
