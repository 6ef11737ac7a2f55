"""Compressed files: index dtypes at their limits, the entropy bound checked exactly, the
entropy-coded size against it, and damaged or foreign files refused by a typed error."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pwf_core import load_compressed, save_compressed
from pwf_core._files import read_metadata, save_tensors
from pwf_core.bayes import bayesian_params, to_bayesian
from pwf_core.checkpoint import save_checkpoint
from pwf_core.errors import CompressedFileError
from pwf_core.export import FORMAT_VERSION, entropy_bound_bytes, index_dtype
from pwf_core.metrics import entropy_bits
from pwf_core.registry import create_method


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


def _fixed_model(seed: int = 0, weights: int = 200_000) -> nn.Module:
    """A model whose weights are fixed to sums of two powers of two, peaked at small values
    as a PWFN model's are."""
    torch.manual_seed(seed)
    model = Wide(500, weights // 500)
    laplace = torch.distributions.Laplace(0.0, 0.03).sample((weights // 500, 500))
    exponents = torch.arange(-9, 0, dtype=torch.float32)
    levels = torch.cat([torch.zeros(1), 2.0**exponents, 2.0 ** exponents[:-1] * 1.5])
    levels = torch.cat([-levels[1:], levels]).sort().values
    nearest = (laplace[..., None] - levels).abs().argmin(-1)
    model.fc.weight.data = levels[nearest]
    to_bayesian(model)
    for param in bayesian_params(model):
        param.fixed_mask.fill_(True)
    return model


def test_file_is_within_five_percent_of_the_entropy_bound(tmp_path):
    model = _fixed_model()
    report = save_compressed(model, tmp_path / "m.safetensors")
    entropy = entropy_bits(model.fc.weight.detach())
    bound = math.ceil(report.shared_weights * entropy / 8) + 4 * report.unique_values
    assert report.entropy_bound_bytes == bound  # no unshared tensors in this model
    assert report.file_bytes <= 1.05 * (report.entropy_bound_bytes + report.header_bytes)
    assert report.bound_ratio <= 1.05
    # The same indices at one byte each: what version 2 files held.
    assert report.fixed_length_bytes == report.header_bytes + 4 * report.unique_values + 200_000
    assert report.file_bytes < 0.6 * report.fixed_length_bytes  # H = 4.6 bits of 8
    loaded = load_compressed(report.path, model=Wide(500, 400))
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def _corrupt(path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _saved(tmp_path) -> tuple[nn.Module, object]:
    model = _fixed_model(weights=20_000)
    return model, save_compressed(model, tmp_path / "m.safetensors")


def test_truncated_file_is_refused_by_name(tmp_path):
    _, report = _saved(tmp_path)
    report.path.write_bytes(report.path.read_bytes()[:-100])
    with pytest.raises(CompressedFileError, match="truncated"):
        load_compressed(report.path, model=Wide(500, 40))


def test_corrupted_index_stream_is_refused_not_loaded_wrong(tmp_path):
    _, report = _saved(tmp_path)
    header_end = 8 + int.from_bytes(report.path.read_bytes()[:8], "little")
    tensors = load_file(str(report.path))
    assert set(tensors) == {"codebook", "index_counts", "index_coded"}
    _corrupt(report.path, 1)  # the last bytes are a tensor's data, after the header
    assert len(report.path.read_bytes()) > header_end
    with pytest.raises(CompressedFileError, match="corrupted"):
        load_compressed(report.path, model=Wide(500, 40))


def _rewrite_header(path, **changes) -> None:
    metadata = read_metadata(path)
    header = json.loads(metadata["pwf"]) | changes
    save_tensors(path, load_file(str(path)), {"pwf": json.dumps(header)})


def test_file_from_a_newer_pwf_asks_for_an_upgrade(tmp_path):
    _, report = _saved(tmp_path)
    _rewrite_header(report.path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CompressedFileError, match=r"newer pwf.*upgrade"):
        load_compressed(report.path, model=Wide(500, 40))


def test_decoder_disagreeing_with_the_encoder_is_caught(tmp_path):
    # What a future coder that quantises probabilities otherwise would do: other indices.
    _, report = _saved(tmp_path)
    header = json.loads(read_metadata(report.path)["pwf"])
    _rewrite_header(report.path, index_crc32=header["index_crc32"] ^ 1)
    with pytest.raises(CompressedFileError, match="decode to other values"):
        load_compressed(report.path, model=Wide(500, 40))


def test_a_run_checkpoint_is_not_a_compressed_model(tmp_path):
    model = _fixed_model(weights=20_000)
    save_checkpoint(tmp_path / "step.safetensors", model, create_method({"method": "uniform"}))
    with pytest.raises(CompressedFileError, match="checkpoint of a run"):
        load_compressed(tmp_path / "step.safetensors", model=Wide(500, 40))


def test_version_2_files_with_fixed_length_indices_still_load(tmp_path):
    model = _fixed_model(weights=20_000)
    codebook = torch.unique(model.fc.weight.detach())
    index = torch.searchsorted(codebook, model.fc.weight.detach()).to(torch.uint8)
    header = {"format_version": 2, "format": "codebook", "model": None, "config": {}}
    path = save_tensors(
        tmp_path / "v2.safetensors",
        {"codebook": codebook, "index.fc.weight": index},
        {"pwf": json.dumps(header)},
    )
    loaded = load_compressed(path, model=Wide(500, 40))
    assert torch.equal(loaded.fc.weight, model.fc.weight)
