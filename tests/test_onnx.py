"""ONNX export: the file runs in ONNX Runtime with pwf's logits, every shared tensor is
``Gather(codebook, Cast(index))`` over one codebook, and the file is smaller than a float ONNX
export; ``pwf export`` as a user runs it, and the inputs it refuses in one line.

Tolerance: ONNX Runtime's kernels sum each conv/gemm in another order than torch's (and fold
each BatchNorm into its conv once the Gather is folded), so float32 logits differ by a few ulps
per accumulation: measured here at most 2e-6 (SignalNet, small CNN on digits) and 6e-8
(resnet18, whose random-init logits are ~0.2). ``TOLERANCE`` (relative to the logits' scale) is
about 100 float32 ulps, ten times that; one weight moved by one codebook step changes a logit
by far more.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from onnx import numpy_helper
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pwf_core
from pwf_core import compress, export_onnx, load_compressed, save_compressed
from pwf_core.bayes import bayesian_params, to_bayesian
from pwf_core.checkpoint import save_checkpoint
from pwf_core.errors import NotCompressedError
from pwf_core.models import ModelSpec, build_model
from pwf_core.onnx_export import CODEBOOK, OnnxExportError, _locate, check_onnx
from pwf_core.pretrain import build_experiment_model
from pwf_flows.cli import main as pwf_main
from tests._dummies.models import SignalNet, signal_data, train_plainly

TOLERANCE = 1e-5
NO_TRAINING = {"epochs": 0, "first_round_epochs": 0}
# Knobs that make each method quick on a small model (training between rounds is off).
QUICK = {
    "pwfn": {"method": "pwfn", "b": 4, "max_order": 2, "schedule": [0.5, 1.0]},
    "wfn": {"method": "wfn", "schedule": [0.5, 1.0]},
    "kmeans": {"method": "kmeans", "clusters": 8, "schedule": [1.0]},
    "uniform": {"method": "uniform", "schedule": [1.0]},
    "2dgbnn": {
        "method": "2dgbnn",
        "bnn_epochs": 1,
        "vi_epochs": 2,
        "gaussians": 8,
        "min_cluster_size": 2,
        "step_samples": 1,
        "eval_samples": 1,
    },
}


def ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def assert_same_logits(path: Path, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    difference = float(np.abs(ort_logits(path, x) - expected).max())
    assert difference <= TOLERANCE * max(1.0, float(np.abs(expected).max()))
    assert check_onnx(path, model, x) == pytest.approx(difference, abs=1e-9)
    return difference


def assert_shared_as_indices(path: Path, result, model: nn.Module, dtype: int) -> None:
    """Every shared tensor is Gather(codebook, Cast(index of ``dtype``)); every other tensor
    of the model is a float32 initializer equal to the model's."""
    graph = onnx.load(str(path)).graph
    inits = {init.name: init for init in graph.initializer}
    produced = {out: node for node in graph.node for out in node.output}
    codebook = numpy_helper.to_array(inits[CODEBOOK])
    assert codebook.dtype == np.float32 and codebook.shape == (result.codebook_size,)
    state = model.state_dict()
    for name in result.shared_tensors:
        assert name not in inits
        gather = produced[name]
        assert gather.op_type == "Gather" and gather.input[0] == CODEBOOK
        cast = produced[gather.input[1]]
        assert cast.op_type == "Cast"
        index = inits[cast.input[0]]
        assert index.data_type == dtype
        values = codebook[numpy_helper.to_array(index).astype(np.int64)]
        assert np.array_equal(values, state[name].detach().cpu().numpy())
    floats = [init for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
    assert {init.name for init in floats} - {CODEBOOK} <= set(state)
    for init in floats:
        if init.name != CODEBOOK:
            assert np.array_equal(numpy_helper.to_array(init), state[init.name].cpu().numpy())
    assert result.file_bytes == path.stat().st_size < result.float_bytes


@pytest.fixture(scope="module")
def signals() -> tuple[torch.Tensor, torch.Tensor]:
    return signal_data(256, seed=0)


@pytest.fixture(scope="module")
def signal_state(signals) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return copy.deepcopy(train_plainly(SignalNet(), *signals, epochs=2).state_dict())


def signal_net(state: dict[str, torch.Tensor]) -> SignalNet:
    model = SignalNet()
    model.load_state_dict(state)
    return model


def compressed_signal_net(state, signals, method: str) -> SignalNet:
    model = signal_net(state)
    loader = DataLoader(TensorDataset(*signals), batch_size=64)
    compress(model, loader, QUICK[method], train=NO_TRAINING, progress=False)
    return model


@pytest.mark.parametrize("method", list(QUICK))
def test_each_method_on_a_users_conv1d_model(method, signal_state, signals, tmp_path):
    model = compressed_signal_net(signal_state, signals, method)
    x = signals[0][:64]
    with torch.no_grad():
        before_logits = model(x)
    before_state = copy.deepcopy(model.state_dict())
    result = export_onnx(model, tmp_path / "signal.onnx", x[:2])
    # The user's model is untouched: still converted, same state, same logits.
    assert bayesian_params(model)
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before_logits)
    plain = copy.deepcopy(model)
    pwf_core.strip(plain)
    assert_shared_as_indices(result.path, result, plain, onnx.TensorProto.UINT8)
    # 2DGBNN shares the weights only; its biases stay float like the BatchNorm.
    shared = {"conv1.weight", "conv2.weight", "head.weight"}
    if method != "2dgbnn":
        shared |= {"conv1.bias", "head.bias"}
    assert set(result.shared_tensors) == shared
    assert result.index_dtype == "uint8" and result.ratio > 1
    assert_same_logits(result.path, model, x)
    assert result.as_metrics() == {
        "size/onnx_bytes": float(result.file_bytes),
        "size/onnx_float_bytes": float(result.float_bytes),
    }


def test_default_small_cnn_on_digits(digits_config, digits, tmp_path):
    model = build_experiment_model(digits_config, digits)
    train = DataLoader(TensorDataset(digits.train.images, digits.train.labels), batch_size=256)
    method = digits_config.compression.model_copy(update={"schedule": (0.5, 1.0)})
    compress(model, train, method, train=NO_TRAINING, progress=False)
    result = export_onnx(model, tmp_path / "small_cnn.onnx", digits.test.images[:1])
    plain = pwf_core.strip(copy.deepcopy(model))
    assert_shared_as_indices(result.path, result, plain, onnx.TensorProto.UINT8)
    assert len(result.shared_tensors) == 5  # three convs (no bias) and the head
    assert not any("features.1" in name for name in result.shared_tensors)  # a BatchNorm
    assert result.ratio > 3  # 56 k weights: one byte instead of four, the graph apart
    assert_same_logits(result.path, model, digits.test.images)


def test_timm_resnet18(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    loader = DataLoader(TensorDataset(x, torch.zeros(4, dtype=torch.long)), batch_size=4)
    compress(model, loader, QUICK["uniform"], train=NO_TRAINING, progress=False)
    result = export_onnx(model, tmp_path / "resnet18.onnx", x[:1])
    convs_and_fc = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(result.shared_tensors) == len(convs_and_fc) + 1 == 22  # and the fc's bias
    assert result.codebook_size == 15 and result.index_dtype == "uint8"
    assert result.ratio > 3.9  # 11.2 MB against 44.7 MB
    # Every BatchNorm reads float initializers (the exporter writes one initializer for
    # equal tensors, such as the freshly initialised running variances, and Identity nodes).
    graph = onnx.load(str(result.path)).graph
    kinds = {i.name: i.data_type for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    norms = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(norms) == 20
    for name in (name for node in norms for name in node.input[1:]):
        assert kinds[alias.get(name, name)] == onnx.TensorProto.FLOAT
    assert_same_logits(result.path, model, x)


def partly_converted_signal_net(state, signals) -> SignalNet:
    """The convs shared (uniform 4-bit); the head kept in float by ``filter_fn``."""
    model = signal_net(state)
    loader = DataLoader(TensorDataset(*signals), batch_size=64)
    compress(
        model,
        loader,
        QUICK["uniform"],
        train=NO_TRAINING,
        progress=False,
        filter_fn=lambda module, name: name != "head",
    )
    return model


def test_a_float_layer_stays_float_and_a_loaded_model_exports_the_same(
    signal_state, signals, tmp_path
):
    model = partly_converted_signal_net(signal_state, signals)
    x = signals[0][:64]
    result = export_onnx(model, tmp_path / "direct.onnx", x[:1])
    assert set(result.shared_tensors) == {"conv1.weight", "conv1.bias", "conv2.weight"}
    plain = pwf_core.strip(copy.deepcopy(model))
    assert_shared_as_indices(result.path, result, plain, onnx.TensorProto.UINT8)
    kinds = {i.name: i.data_type for i in onnx.load(str(result.path)).graph.initializer}
    assert kinds["head.weight"] == kinds["head.bias"] == onnx.TensorProto.FLOAT
    assert_same_logits(result.path, model, x)

    saved = save_compressed(model, tmp_path / "signal.safetensors")
    loaded = load_compressed(saved.path, model=SignalNet())
    again = export_onnx(loaded, tmp_path / "loaded.onnx", x[:1])
    assert again.shared_tensors == result.shared_tensors
    assert again.codebook_size == result.codebook_size
    assert (tmp_path / "loaded.onnx").read_bytes() == (tmp_path / "direct.onnx").read_bytes()


def test_more_than_256_values_take_uint16_indices(tmp_path):
    generator = torch.Generator().manual_seed(0)
    values = torch.linspace(-1, 1, 300)
    chosen = torch.cat([values, values[torch.randint(0, 300, (2700,), generator=generator)]])
    model = nn.Sequential(nn.Linear(60, 50, bias=False))
    model[0].weight.data = chosen[torch.randperm(3000, generator=generator)].view(50, 60)
    to_bayesian(model)
    for param in bayesian_params(model):
        param.fixed_mask.fill_(True)
    x = torch.randn(8, 60)
    result = export_onnx(model, tmp_path / "wide.onnx", x, opset=13)
    assert result.codebook_size == 300 and result.index_dtype == "uint16"
    assert onnx.load(str(result.path)).opset_import[0].version == 13
    plain = pwf_core.strip(copy.deepcopy(model))
    assert_shared_as_indices(result.path, result, plain, onnx.TensorProto.UINT16)
    assert_same_logits(result.path, model, x)


class Twins(nn.Module):
    """Two layers with equal weights: the exporter stores them as one initializer."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
        self.second.weight.data = self.first.weight.data.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_equal_renamed_and_transposed_tensors_are_found(tmp_path):
    model = Twins()
    to_bayesian(model)
    for param in bayesian_params(model):
        param.mu.data = torch.round(param.mu.data * 8) / 8
        param.fixed_mask.fill_(True)
    x = torch.randn(4, 6)
    result = export_onnx(model, tmp_path / "twins.onnx", x)
    graph = onnx.load(str(result.path)).graph
    assert [i.data_type for i in graph.initializer].count(onnx.TensorProto.FLOAT) == 1
    (twin,) = [node for node in graph.node if node.op_type == "Identity"]
    assert sorted([*twin.input, *twin.output]) == ["first.weight", "second.weight"]
    assert_same_logits(result.path, model, x)

    weight = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    renamed = onnx.helper.make_graph(
        [], "g", [], [], [numpy_helper.from_array(weight.T.copy(), "onnx::MatMul_7")]
    )
    assert _locate(renamed, {"fc.weight": weight}) == {"fc.weight": "onnx::MatMul_7"}
    with pytest.raises(OnnxExportError, match=r"'fc.bias' \(3,\) in no initializer"):
        _locate(renamed, {"fc.weight": weight, "fc.bias": weight[0] + 1})


def test_what_export_onnx_refuses(signal_state, signals, tmp_path):
    out = tmp_path / "refused.onnx"
    x = signals[0][:2]
    with pytest.raises(NotCompressedError, match="not compressed"):
        export_onnx(signal_net(signal_state), out, x)
    half = signal_net(signal_state)
    to_bayesian(half)
    bayesian_params(half)[0].fixed_mask.fill_(True)
    with pytest.raises(NotCompressedError, match="still free"):
        export_onnx(half, out, x)
    model = partly_converted_signal_net(signal_state, signals)
    with pytest.raises(ValueError, match=r"does not run through the model: RuntimeError"):
        export_onnx(model, out, torch.randn(2, 3, 32))  # three channels, the model takes two
    with pytest.raises(ValueError, match="must be a tensor"):
        export_onnx(model, out, "signals.npy")
    with pytest.raises(ValueError, match="must be a tensor"):
        export_onnx(model, out, [])
    assert list(tmp_path.iterdir()) == []


def test_check_onnx_says_what_is_missing(monkeypatch, signal_state, signals, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        check_onnx(tmp_path / "any.onnx", signal_net(signal_state), signals[0][:2])


SMALL_CNN = ModelSpec("small_cnn", num_classes=10, in_chans=1, img_size=8)


@pytest.fixture(scope="module")
def compressed_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(SMALL_CNN.name, 10, 1)
    x = torch.rand(64, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 10, (64,))), batch_size=64)
    compress(model, loader, QUICK["pwfn"], train=NO_TRAINING, progress=False)
    return model


def test_pwf_export_as_a_user_runs_it(compressed_cnn, tmp_path):
    source = tmp_path / "model.pwf.safetensors"
    save_compressed(compressed_cnn, source, spec=SMALL_CNN, config={"data": {"name": "digits"}})
    out = tmp_path / "shipped" / "cnn.onnx"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pwf"), "export", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    line, inputs = done.stdout.splitlines()
    assert inputs.startswith("  input: not recorded")  # saved without the dataset's contract
    found = re.fullmatch(
        r"pwf export: (\S+): ([\d,]+) bytes \(float ONNX ([\d,]+) bytes, ([\d.]+)x smaller\); "
        r"5 shared tensors on (\d+) values \(uint8 indices\); "
        r"max \|logit difference\| vs pwf (\S+)",
        line,
    )
    assert found, line
    assert Path(found[1]) == out and int(found[2].replace(",", "")) == out.stat().st_size
    assert float(found[4]) > 3 and float(found[6]) <= TOLERANCE
    loaded = load_compressed(source)
    assert_same_logits(out, loaded, torch.rand(16, 1, 8, 8))


def test_pwf_export_refuses_what_it_cannot_ship(compressed_cnn, tmp_path, capsys):
    whole = tmp_path / "whole.safetensors"
    save_compressed(compressed_cnn, whole, spec=SMALL_CNN)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    own_class = tmp_path / "own.safetensors"
    save_compressed(compressed_cnn, own_class)
    step = tmp_path / "step.safetensors"
    half = build_model(SMALL_CNN.name, 10, 1)
    to_bayesian(half)
    save_checkpoint(step, half, header={"step": "round 1/2", "metrics": {"cls/acc": 0.5}})
    cases = {
        step: ("checkpoint", "not a compressed model"),
        truncated: (str(truncated),),
        own_class: ("own class", "pwf_core.export_onnx(model, path, example_input)"),
    }
    for path, words in cases.items():
        out = tmp_path / "out" / f"{path.stem}.onnx"
        code = pwf_main(["export", str(path), "--out", str(out)])
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert code == 2 and line.startswith("pwf: ") and all(w in line for w in words), line
        assert captured.out == "" and not (tmp_path / "out").exists()
