"""What an experiment's run is called and says about itself: its name, its description, and the
per-step table of its Prefect artifact (the columns are the method's)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from pwf_core.config import ExperimentConfig
from pwf_core.methods import Method, Step
from pwf_flows.artifacts import run_key


def default_run_name(config: ExperimentConfig) -> str:
    """What tells this run from its neighbours: method, model, data and a config hash (and
    its replicate, for a replicate)."""
    name = f"{config.compression.method}-{config.model.name}-{config.data.name}-"
    name += run_key(config)[:6]
    return name + (f" r{config.replicate.index}" if config.replicate.index else "")


def description(config: ExperimentConfig, plan: list[Step]) -> str:
    """The run's MLflow description."""
    return (
        f"{config.compression.method} on {config.model.name} / {config.data.name}, "
        f"{len(plan)} steps, seed {config.seed}"
        + (f", replicate {config.replicate.index}" if config.replicate.index else "")
        + f"; artifacts key {run_key(config)}"
    )


def artifact_key(config: ExperimentConfig) -> str:
    """The Prefect artifact's key: lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", config.name.lower()).strip("-")[:40]
    return f"pwf-{slug}-{run_key(config)[:8]}"


def size_line(final: Mapping[str, float]) -> str:
    """``13,512 bytes entropy-coded (62,301 at fixed length), 17.1x smaller than float32``."""
    if "size/file_bytes" not in final:
        return "not exported"
    line = f"{int(final['size/file_bytes']):,} bytes entropy-coded"
    if "size/fixed_length_bytes" in final:
        line += f" ({int(final['size/fixed_length_bytes']):,} at fixed length)"
    if "size/compression_ratio" in final:
        line += f", {final['size/compression_ratio']:.1f}x smaller than float32"
    return line


def markdown(
    title: str,
    method: Method,
    run_id: str,
    url: str,
    rows: list[Mapping[str, float | str]],
    final: Mapping[str, float],
) -> str:
    """The Prefect artifact: one row per step in the method's columns, the final line, and the
    MLflow run's link."""
    columns = method.table_columns
    lines = [
        f"### {title}",
        "",
        f"MLflow run: [{run_id}]({url})",
        "",
        "| step | " + " | ".join(column.label for column in columns) + " |",
        "|" + " --- |" * (len(columns) + 1),
    ]
    for row in rows:
        cells = [column.fmt(row[column.key]) if column.key in row else "" for column in columns]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**final**: {method.summary_line(final)}; {size_line(final)}",
    ]
    return "\n".join(lines)
