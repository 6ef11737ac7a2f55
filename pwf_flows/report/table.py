"""The report's table: one row per run, the quantities the compression papers compare, in the
keys every method shares; as CSV (raw values), Markdown and HTML cells (formatted)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

from pwf_flows.report.collect import ReportRun


@dataclass(frozen=True)
class Field:
    """A column: its header, the metric (or ``None`` for a computed one), its format."""

    header: str
    key: str | None
    fmt: Callable[[float], str]
    value: Callable[[ReportRun], float | None] | None = None

    def of(self, run: ReportRun) -> float | None:
        value = self.value(run) if self.value is not None else run.metric(self.key or "")
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    def cell(self, run: ReportRun) -> str:
        value = self.of(run)
        return "—" if value is None else self.fmt(value)


def _delta(run: ReportRun) -> float | None:
    accuracy = run.metric("cls/acc")
    if accuracy is None or run.pretrained_acc is None:
        return None
    return accuracy - run.pretrained_acc


def _count(value: float) -> str:
    return f"{round(value):,}"


FIELDS = (
    Field("top-1", "cls/acc", lambda v: f"{100 * v:.2f} %"),
    Field("Δ top-1 vs pretrained", None, lambda v: f"{100 * v:+.2f} pt", _delta),
    Field("unique values", "ws/unique_values", _count),
    Field("shared values", "ws/shared_values", _count),
    Field("outliers", "ws/outliers", _count),
    Field("entropy (bits)", "ws/entropy_bits", lambda v: f"{v:.2f}"),
    Field("file bytes (entropy-coded)", "size/file_bytes", _count),
    Field("fixed-length bytes", "size/fixed_length_bytes", _count),
    Field("entropy bound bytes", "size/entropy_bound_bytes", _count),
    Field("× smaller than float32", "size/compression_ratio", lambda v: f"{v:.1f}×"),
    Field("ONNX bytes", "size/onnx_bytes", _count),
    Field("ECE", "cal/ece", lambda v: f"{v:.4f}"),
    Field("NLL", "cls/nll", lambda v: f"{v:.4f}"),
    Field("trainable parameters", "size/trainable_params", _count),
)


def knobs_text(run: ReportRun) -> str:
    return ", ".join(f"{key}={value}" for key, value in run.knobs.items()) or "defaults"


def ordered(runs: list[ReportRun]) -> list[ReportRun]:
    """By method, then best top-1 first."""
    return sorted(runs, key=lambda run: (run.method, -(run.metric("cls/acc") or 0.0)))


def to_csv(panels: dict[str, list[ReportRun]]) -> str:
    """Every run, raw values (fractions, counts, bytes), one line each."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    headers = ["panel", "method", "run", "run_id", "knobs"]
    writer.writerow(headers + [field.header for field in FIELDS] + ["mlflow_url", "prefect_url"])
    for panel, runs in panels.items():
        for run in ordered(runs):
            values = [field.of(run) for field in FIELDS]
            writer.writerow(
                [panel, run.method, run.name, run.run_id, knobs_text(run)]
                + ["" if value is None else repr(value) for value in values]
                + [run.url, run.prefect_url or ""]
            )
    return buffer.getvalue()


def to_markdown(panels: dict[str, list[ReportRun]]) -> str:
    """One table per panel, formatted as the page shows it, runs linked."""
    lines = []
    for panel, runs in panels.items():
        lines += [f"### {panel}", ""]
        lines.append("| method | run | knobs | " + " | ".join(f.header for f in FIELDS) + " |")
        lines.append("|" + " --- |" * (len(FIELDS) + 3))
        for run in ordered(runs):
            cells = [field.cell(run) for field in FIELDS]
            lines.append(
                f"| {run.method} | [{run.name}]({run.url}) | {knobs_text(run)} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)
