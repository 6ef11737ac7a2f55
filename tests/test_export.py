"""Compressed export: index dtypes at their limits and the entropy bound, checked exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pwf_core import load_compressed, save_compressed
from pwf_core.bayes import bayesian_params, to_bayesian
from pwf_core.export import entropy_bound_bytes, index_dtype


class Wide(nn.Module):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.fc = nn.Linear(inputs, outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize(
    ("distinct", "shape", "dtype"),
    [(256, (16, 16), torch.uint8), (257, (17, 17), torch.int16), (32_769, (182, 182), torch.int32)],
)
def test_round_trip_with_many_distinct_values(distinct, shape, dtype, tmp_path):
    torch.manual_seed(0)
    model = Wide(shape[1], shape[0])
    values = torch.linspace(-1, 1, distinct)
    chosen = torch.cat([values, values[torch.randint(0, distinct, (math.prod(shape) - distinct,))]])
    model.fc.weight.data = chosen[torch.randperm(len(chosen))].view(shape)
    to_bayesian(model)
    for param in bayesian_params(model):
        param.fixed_mask.fill_(True)
    assert index_dtype(distinct) == dtype
    report = save_compressed(model, tmp_path / "wide.safetensors")
    assert report.unique_values == distinct and report.index_bits == torch.iinfo(dtype).bits
    loaded = load_compressed(report.path, model=Wide(shape[1], shape[0]))
    x = torch.randn(8, shape[1])
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
        assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_entropy_bound_is_in_bits():
    # 1000 indices split evenly over two values: 1 bit each, 125 bytes (in nats: 87), plus
    # 4 bytes per codebook entry and the other parameters.
    assert entropy_bound_bytes(torch.tensor([500, 500]), other_bytes=10) == 125 + 8 + 10
    # Four equally likely values: 2 bits each for 800 indices = 200 bytes.
    assert entropy_bound_bytes(torch.tensor([200] * 4), other_bytes=0) == 200 + 16
