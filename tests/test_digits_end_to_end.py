"""Every method end to end on the pretrained small CNN and digits, through Compression."""

from __future__ import annotations

import math

import pytest
import torch

from pwf_core import Compression, load_compressed, save_compressed
from pwf_core.bayes import bayesian_params, to_bayesian
from pwf_core.config import load_config
from pwf_core.export import read_header
from pwf_core.methods.rounds import FixingMethod
from pwf_core.pretrain import build_experiment_model, model_spec
from pwf_core.registry import create_method, method_names
from tests.conftest import DEFAULT_CONFIG

ROUND_KEYS = {
    "cls/acc",
    "cls/acc5",
    "cls/nll",
    "cal/ece",
    "cal/brier",
    "ws/unique_values",
    "ws/unique_fixed_values",
    "ws/entropy_bits",
    "ws/fixed_fraction",
    "ws/params_converted",
    "ws/params_other",
    "ws/params_excluded",
    "ws/shared_values",
    "ws/outliers",
    "train/loss",
    "train/steps",
    "time/train_s",
    "time/fix_s",
    "time/eval_s",
}
BASELINE_KNOBS = {"kmeans": {"clusters": 16}, "uniform": {"bits": 4}}
LIMITS = {"kmeans": 16, "uniform": 15}
BASELINES = [
    name
    for name in method_names()
    if name != "pwfn" and isinstance(create_method({"method": name}), FixingMethod)
]


def compression_for(config, digits, pretrained_state) -> Compression:
    model = build_experiment_model(config, digits)
    model.load_state_dict(pretrained_state[0])
    return Compression(
        model,
        config.compression,
        digits.loader("train", config.train.batch_size, shuffle=True, seed=1),
        eval_loader=digits.loader("test", config.data.eval_batch_size),
        train=config.train,
        seed=config.seed,
        progress=False,
        mc_samples=config.eval.mc_samples,
    )


@pytest.fixture(scope="module")
def pwfn_run(digits_config, digits, pretrained_state):
    """The shipped default: PWFN (b: auto) on the pretrained small CNN, paper schedule."""
    run = compression_for(digits_config, digits, pretrained_state)
    run.convert()
    records = [run.run_step(step) for step in run.steps]
    return run, records


@pytest.mark.slow
def test_pwfn_keeps_accuracy_with_few_values(pwfn_run, pretrained_state, digits_config):
    run, records = pwfn_run
    pretrained_acc = pretrained_state[1].test_metrics["cls/acc"]
    final = records[-1].metrics
    assert final["ws/fixed_fraction"] == 1.0
    assert final["ws/unique_values"] == final["ws/unique_fixed_values"] <= 64
    assert final["pwfn/b"] == 5  # b: auto on this CNN
    assert final["cls/acc"] >= pretrained_acc - 0.01
    assert [r.step.fraction for r in records] == list(digits_config.compression.schedule)
    for record in records:
        # Where free weights are headed, while some are free: the early-stopping signal.
        projected = {"ws/projected_values"} if record.step.fraction < 1 else set()
        assert set(record.metrics) == ROUND_KEYS | {"pwfn/b"} | projected
        total = record.metrics["ws/params_converted"]
        fraction = record.step.fraction
        assert record.metrics["ws/fixed_fraction"] * total == math.ceil(fraction * total)
    # The metrics are taken after fixing: measuring the final model again agrees.
    assert run.context.evaluate(run.model)["cls/acc"] == final["cls/acc"]


@pytest.mark.slow
def test_a_fully_fixed_model_reports_no_sampled_metrics(pwfn_run):
    """Every weight fixed: the model is deterministic, so ``sampled/*`` would only measure
    noise from the fixed weights' leftover sigmas."""
    run, records = pwfn_run
    metrics = run.finalize()
    assert not [key for key in metrics if key.startswith("sampled/")]
    assert metrics["cls/acc"] == metrics["mean/cls/acc"] == records[-1].metrics["cls/acc"]
    assert metrics["cls/acc"] == run.context.evaluate(run.model)["cls/acc"]


@pytest.mark.slow
def test_export_round_trip(pwfn_run, digits_config, digits, tmp_path):
    run, records = pwfn_run
    run.finalize()
    spec = model_spec(digits_config, digits)
    report = save_compressed(run.model, tmp_path / "model.safetensors", spec=spec, config={"a": 1})
    assert report.unique_values == records[-1].metrics["ws/unique_values"]
    assert report.index_bits == 8
    assert report.entropy_bound_bytes < report.file_bytes < report.fixed_length_bytes
    assert report.fixed_length_bytes < report.float32_bytes
    loaded = load_compressed(report.path)
    assert not any(n.endswith("_sigma") for n in loaded.state_dict())
    images = torch.cat([x for x, _ in digits.loader("test", 128)])
    with torch.no_grad():
        assert torch.equal(loaded(images), run.model.eval()(images))
    header = read_header(report.path)
    assert header["model"]["name"] == "small_cnn" and header["config"] == {"a": 1}
    assert [name for name, _ in header["layout"]] == [p.name for p in bayesian_params(run.model)]


def test_export_refuses_free_weights(pretrained_cnn, tmp_path):
    with pytest.raises(ValueError, match="no converted weights"):
        save_compressed(pretrained_cnn, tmp_path / "m.safetensors")
    to_bayesian(pretrained_cnn)
    with pytest.raises(ValueError, match="must be fixed"):
        save_compressed(pretrained_cnn, tmp_path / "m.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_baselines_run_through_the_same_driver(name, digits, pretrained_state):
    overrides = {"compression": {"method": name, **BASELINE_KNOBS.get(name, {})}, "train.epochs": 1}
    config = load_config(DEFAULT_CONFIG, overrides)
    run = compression_for(config, digits, pretrained_state)
    run.convert()
    records = [run.run_step(step) for step in run.steps]
    assert all(set(r.metrics) >= ROUND_KEYS for r in records)
    final = records[-1].metrics
    assert final["ws/fixed_fraction"] == 1.0
    assert final["cls/acc"] > 0.9
    if name in LIMITS:
        assert final["ws/unique_values"] <= LIMITS[name]


@pytest.mark.slow
def test_fixed_weights_never_move_in_a_timm_model(digits):
    """A real timm network through training and fixing: fixed entries stay bit-exact."""
    config = load_config(
        DEFAULT_CONFIG,
        {"model.name": "test_resnet", "train.epochs": 0.5, "compression.schedule": [0.3, 0.6, 1.0]},
    )
    model = build_experiment_model(config, digits)
    train_loader = digits.loader("train", 64, shuffle=True)
    run = Compression(model, config.compression, train_loader, train=config.train, progress=False)
    run.convert()
    snapshots: list[dict[str, torch.Tensor]] = []
    for step in run.steps:
        run.run_step(step)
        params = bayesian_params(model)
        for previous in snapshots:
            for param in params:
                was_fixed = previous[f"{param.name}.mask"]
                assert torch.equal(param.mu.detach()[was_fixed], previous[param.name][was_fixed])
        snapshots.append(
            {p.name: p.mu.detach().clone() for p in params}
            | {f"{p.name}.mask": p.fixed_mask.clone() for p in params}
        )
    assert all(bool(p.fixed_mask.all()) for p in bayesian_params(model))
