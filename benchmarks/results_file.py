"""The JSON file every benchmark writes: its rows plus the machine they were measured on."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch


def write_results(path: Path, benchmark: str, rows: list[dict[str, Any]], **context: Any) -> None:
    """Write ``rows`` with the torch version, thread count and processor to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": benchmark,
        **context,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": rows,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")
