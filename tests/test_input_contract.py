"""A shipped model says how to feed it: each dataset reader states its input contract, the
compressed file and the ONNX file record it, and an engineer who has only the ONNX file feeds
it raw digits in ONNX Runtime and gets pwf's top-1 (with the normalisation done by hand from
the file's metadata, or by the graph itself after ``pwf export --preprocess``)."""

from __future__ import annotations

import ast
import json
import re

import numpy as np
import onnxruntime
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from pwf_core import compress, load_compressed, save_compressed
from pwf_core.data import DataConfig, InputContract, load_dataset, recorded_contract
from pwf_core.data.splits import SPLIT_SEED
from pwf_core.export import read_header
from pwf_core.onnx_export import INPUT_METADATA, recorded_input
from pwf_core.pretrain import build_experiment_model, model_spec
from pwf_flows.cli import main as pwf_main
from tests._dummies.files import write_cifar10, write_image_folder, write_mnist
from tests.conftest import ROOT

NO_TRAINING = {"epochs": 0, "first_round_epochs": 0}


def _raw_digits_test_split() -> tuple[np.ndarray, np.ndarray]:
    """The 359 test digits as scikit-learn ships them (pixels 0 to 16), in pwf's split."""
    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test = order[: round(0.2 * len(order))].numpy()
    return digits.images[test][:, None].astype(np.float32), digits.target[test]


def test_each_reader_states_the_contract_it_normalises_with(tmp_path):
    digits = load_dataset(DataConfig())
    contract = digits.contract
    assert contract.shape == (1, 8, 8) and contract.raw_range == (0.0, 16.0)
    assert contract.divide_by == 16.0 and contract.class_names == tuple("0123456789")
    assert contract.mean[0] == pytest.approx(0.3056, abs=1e-4)
    assert contract.std[0] == pytest.approx(0.3761, abs=1e-4)
    raw, _ = _raw_digits_test_split()
    assert torch.equal(contract.normalise(torch.from_numpy(raw)), digits.test.images)
    assert InputContract.from_dict(json.loads(json.dumps(contract.as_dict()))) == contract

    mnist = load_dataset(DataConfig(name="mnist", path=write_mnist(tmp_path / "mnist")))
    assert mnist.contract.shape == (1, 28, 28) and mnist.contract.divide_by == 255.0
    assert mnist.contract.mean == (0.1307,) and mnist.contract.std == (0.3081,)
    cifar = load_dataset(DataConfig(name="cifar10", path=write_cifar10(tmp_path / "cifar")))
    assert cifar.contract.shape == (3, 32, 32) and cifar.contract.class_names[0] == "airplane"
    folder = write_image_folder(tmp_path / "images", classes=2)
    images = load_dataset(DataConfig(name="imagefolder", path=folder, img_size=32, num_workers=0))
    assert images.contract.mean == (0.485, 0.456, 0.406) and images.contract.shape == (3, 32, 32)
    assert images.contract.class_names == tuple(p.name for p in sorted((folder / "val").iterdir()))
    assert "centre-cropped to 32 x 32" in images.contract.resize


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, digits_config, digits, pretrained_state):
    """The pretrained small CNN compressed on digits, saved with its contract as a run saves
    it; pwf's own predictions on the test split."""
    model = build_experiment_model(digits_config, digits)
    model.load_state_dict(pretrained_state[0])
    train = DataLoader(TensorDataset(digits.train.images, digits.train.labels), batch_size=256)
    method = digits_config.compression.model_copy(update={"schedule": (0.5, 1.0)})
    compress(model, train, method, train=NO_TRAINING, progress=False)
    with torch.no_grad():
        predicted = model(digits.test.images).argmax(1).numpy()
    path = tmp_path_factory.mktemp("shipped") / "model.pwf.safetensors"
    spec = model_spec(digits_config, digits)
    config = {"data": {"name": "digits"}}
    save_compressed(model, path, spec=spec, config=config, contract=digits.contract)
    return path, predicted


def _predicted(session: onnxruntime.InferenceSession, inputs: np.ndarray) -> np.ndarray:
    (logits,) = session.run(None, {session.get_inputs()[0].name: inputs})
    return logits.argmax(1)


def test_the_onnx_file_alone_says_how_to_feed_it_raw_digits(shipped, capsys):
    path, pwf_predicted = shipped
    raw, labels = _raw_digits_test_split()
    pwf_top1 = (pwf_predicted == labels).mean()
    assert pwf_top1 > 0.9  # a trained model: raw pixels fed as they are would show
    assert recorded_contract(read_header(path)) == load_dataset(DataConfig()).contract
    plain, baked = path.with_name("plain.onnx"), path.with_name("raw.onnx")
    assert pwf_main(["export", str(path), "--out", str(plain)]) == 0
    assert pwf_main(["export", str(path), "--out", str(baked), "--preprocess"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("  input: float32 [batch x 1 x 8 x 8] (NCHW): raw pixels 0 to 16")
    assert "divide by 16, subtract mean (0.3056), divide by std (0.3761)" in printed[1]
    assert "normalised in the graph" in printed[3] and "10 classes: 0, 1, 2" in printed[3]

    # What the engineer who receives plain.onnx does, with nothing but the file.
    session = onnxruntime.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    recorded = json.loads(session.get_modelmeta().custom_metadata_map[INPUT_METADATA])
    assert recorded == recorded_input(plain) and not recorded["normalisation_in_graph"]
    assert session.get_inputs()[0].shape[1:] == recorded["shape"]
    view = (1, -1, 1, 1)
    mean = np.asarray(recorded["mean"], dtype=np.float32).reshape(view)
    std = np.asarray(recorded["std"], dtype=np.float32).reshape(view)
    fed = (raw / np.float32(recorded["divide_by"]) - mean) / std
    onnx_predicted = _predicted(session, fed)
    np.testing.assert_array_equal(onnx_predicted, pwf_predicted)  # pwf's top-1, digit by digit
    unfed = (_predicted(session, raw) == labels).mean()  # raw pixels as they are: the issue
    assert unfed < pwf_top1 - 0.2, unfed
    names = [recorded["class_names"][i] for i in onnx_predicted]
    assert np.mean([n == str(y) for n, y in zip(names, labels, strict=True)]) == pwf_top1

    session = onnxruntime.InferenceSession(str(baked), providers=["CPUExecutionProvider"])
    recorded = json.loads(session.get_modelmeta().custom_metadata_map[INPUT_METADATA])
    assert recorded["normalisation_in_graph"] and recorded["raw_range"] == [0.0, 16.0]
    np.testing.assert_array_equal(_predicted(session, raw), pwf_predicted)


def test_a_file_without_a_contract_still_loads_and_exports(shipped, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path, _ = shipped
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    header = json.loads(metadata["pwf"])
    del header["input"]  # what pwf wrote before it recorded contracts
    older = tmp_path / "older.pwf.safetensors"
    save_file(load_file(str(path)), str(older), metadata={"pwf": json.dumps(header)})
    assert recorded_contract(read_header(older)) is None
    assert load_compressed(older) is not None
    out = tmp_path / "older.onnx"
    assert pwf_main(["export", str(older), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("  input: not recorded") and recorded_input(out) is None
    refused = tmp_path / "refused.onnx"
    assert pwf_main(["export", str(older), "--out", str(refused), "--preprocess"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pwf: ") and "records no input contract" in line
    assert not refused.exists()


def test_the_readmes_onnx_runtime_block_feeds_raw_digits(shipped, tmp_path, monkeypatch, capsys):
    """The README's block, executed as written, on the files its ``pwf export`` lines write."""
    path, _ = shipped
    monkeypatch.chdir(tmp_path)
    assert pwf_main(["export", str(path), "--out", "small_cnn.onnx"]) == 0
    assert pwf_main(["export", str(path), "--out", "small_cnn_raw.onnx", "--preprocess"]) == 0
    capsys.readouterr()
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Feeding it raw data in ONNX Runtime", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = ast.literal_eval(capsys.readouterr().out.strip())
    model, contract = load_compressed(path), recorded_contract(read_header(path))
    raw = torch.from_numpy(load_digits().images[:8, None].astype(np.float32))
    with torch.no_grad():
        expected = model(contract.normalise(raw)).argmax(1).tolist()
    assert printed == [contract.class_names[i] for i in expected]
    np.testing.assert_array_equal(namespace["logits"].argmax(1), expected)  # the raw-pixel file
