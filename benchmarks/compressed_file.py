"""Size and speed of the entropy-coded compressed file for a ResNet-18-sized model.

A timm ``resnet18`` (11.2 M converted weights; random initialisation: no hub weights here)
has every weight fixed to its nearest value in a power-of-two codebook (``±2^-k`` and sums of
two, PWFN's ``max_order: 2`` values), as at the end of a PWFN run, at two spreads: the
initialisation's and a four times narrower one. For each, the file is written and read back:
bytes against the entropy bound plus header (bar: within 5 %), against the fixed-length
form and float32, and seconds of the index coding alone and of the whole save and load
(bar: encode and decode each <= 10 s). Writes ``benchmarks/results/compressed_file.json``.

Usage: ``python benchmarks/compressed_file.py``
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import timm
import torch
from results_file import write_results

from pwf_core import _entropy as entropy_coding
from pwf_core import load_compressed, save_compressed
from pwf_core._entropy import symbol_counts
from pwf_core.bayes import bayesian_params, to_bayesian
from pwf_core.metrics import converted_values

RESULTS = Path(__file__).parent / "results" / "compressed_file.json"


def _power_of_two_codebook() -> torch.Tensor:
    exponents = 2.0 ** -torch.arange(0, 12, dtype=torch.float32)
    sums = (exponents[:, None] + exponents[None, :]).flatten()
    positive = torch.unique(torch.cat([exponents, sums]))
    return torch.cat([-positive.flip(0), torch.zeros(1), positive])


@torch.no_grad()
def fixed_resnet18(spread: float) -> torch.nn.Module:
    """A resnet18 whose weights (scaled by ``spread``) are snapped to the codebook."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    to_bayesian(model)
    codebook = _power_of_two_codebook()
    for param in bayesian_params(model):
        values = param.mu.mul_(spread).flatten()
        index = torch.searchsorted(codebook, values).clamp(1, len(codebook) - 1)
        lower, upper = codebook[index - 1], codebook[index]
        param.mu.copy_(torch.where(values - lower < upper - values, lower, upper).view_as(param.mu))
        param.fixed_mask.fill_(True)
    return model.eval()


def measure(spread: float, folder: Path) -> dict:
    model = fixed_resnet18(spread)
    values = converted_values(model)
    codebook = torch.unique(values)
    symbols = torch.searchsorted(codebook, values)
    counts = symbol_counts(symbols, len(codebook))
    started = time.perf_counter()
    words, crc = entropy_coding.encode(symbols, counts)
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = entropy_coding.decode(words, counts, crc)
    decode_s = time.perf_counter() - started
    assert torch.equal(decoded, symbols)

    started = time.perf_counter()
    report = save_compressed(model, folder / f"resnet18-{spread}.safetensors")
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = load_compressed(report.path, model=timm.create_model("resnet18", num_classes=1000))
    load_s = time.perf_counter() - started
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    p = counts[counts > 0].double() / counts.sum()
    return {
        "spread": spread,
        "weights": report.shared_weights,
        "unique_values": report.unique_values,
        "entropy_bits": round(float(-(p * p.log2()).sum()), 3),
        "file_bytes": report.file_bytes,
        "entropy_bound_bytes": report.entropy_bound_bytes,
        "header_bytes": report.header_bytes,
        "bytes_over_bound_plus_header": round(report.bound_ratio, 5),
        "fixed_length_bytes": report.fixed_length_bytes,
        "float32_bytes": report.float32_bytes,
        "ratio_vs_float32": round(report.compression_ratio, 2),
        "encode_s": round(encode_s, 3),
        "decode_s": round(decode_s, 3),
        "save_s": round(save_s, 3),
        "load_s": round(load_s, 3),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(spread, Path(folder)) for spread in (1.0, 0.25)]
    for row in rows:
        print(row)
    write_results(RESULTS, "compressed_file", rows, bar_bound_ratio=1.05, bar_seconds=10)


if __name__ == "__main__":
    main()
