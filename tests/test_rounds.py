"""The round driver end to end on digits, for every registered method, and the export."""

import math

import pytest
import torch

from pwf_core.bayes import bayesian_params
from pwf_core.config import load_config
from pwf_core.data import load_dataset
from pwf_core.export import export_compressed, load_compressed, read_header
from pwf_core.methods import create_method, method_names
from pwf_core.metrics import evaluate
from pwf_core.pretrain import build_experiment_model, model_spec
from pwf_core.rounds import RoundRecord, final_metrics, run_schedule
from tests.conftest import DEFAULT_CONFIG

ROUND_KEYS = {
    "cls/acc",
    "cls/acc5",
    "cls/nll",
    "cal/ece",
    "cal/brier",
    "ws/unique_values",
    "ws/entropy_bits",
    "ws/fixed_fraction",
    "ws/params_converted",
    "ws/params_other",
    "train/loss",
    "train/steps",
    "time/train_s",
    "time/fix_s",
    "time/eval_s",
}


@pytest.fixture(scope="module")
def pwfn_run(digits_config, digits, pretrained_state):
    """The shipped default: PWFN on the pretrained small CNN, full paper schedule."""
    model = build_experiment_model(digits_config, digits)
    model.load_state_dict(pretrained_state[0])
    records = run_schedule(model, digits_config, digits, "cpu", progress=False)
    return model, records


@pytest.mark.slow
def test_pwfn_keeps_accuracy_with_few_values(pwfn_run, pretrained_state):
    model, records = pwfn_run
    pretrained_acc = pretrained_state[1].test_metrics["cls/acc"]
    final = records[-1].metrics
    assert final["ws/fixed_fraction"] == 1.0
    assert final["ws/unique_values"] <= 64
    assert final["cls/acc"] >= pretrained_acc - 0.01
    assert [r.fraction for r in records] == list(load_config(DEFAULT_CONFIG).fixing.schedule)
    for record in records:
        assert set(record.metrics) == ROUND_KEYS
        total = record.metrics["ws/params_converted"]
        assert record.metrics["ws/fixed_fraction"] * total == math.ceil(record.fraction * total)
    # Metrics are taken after fixing: recomputing them on the final model agrees.
    test_loader = load_dataset(load_config().data).loader("test", 512)
    assert evaluate(model, test_loader, "cpu")["cls/acc"] == final["cls/acc"]


@pytest.mark.slow
def test_final_metrics_with_sampling_on_and_off(pwfn_run, digits_config, digits):
    model, _ = pwfn_run
    metrics = final_metrics(
        model, create_method(digits_config.fixing), digits_config, digits, "cpu"
    )
    assert {"cls/acc", "cal/ece", "cls/nll", "cls/acc_mc", "cal/ece_mc", "cls/nll_mc"} <= set(
        metrics
    )
    assert 0 <= metrics["cal/ece_mc"] <= 1


@pytest.mark.slow
def test_export_round_trip(pwfn_run, digits_config, digits, tmp_path):
    model, records = pwfn_run
    spec = model_spec(digits_config, digits)
    report = export_compressed(model, tmp_path / "model.safetensors", spec, {"name": "x"})
    assert report.unique_values == records[-1].metrics["ws/unique_values"]
    assert report.index_bits == 8
    assert report.file_bytes < report.float32_bytes
    assert report.entropy_bound_bytes < report.file_bytes
    loaded = load_compressed(report.path)
    assert not any(n.endswith("_sigma") for n in loaded.state_dict())
    model.eval()
    images = torch.cat([x for x, _ in digits.loader("test", 128)])
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    header = read_header(report.path)
    assert header["model"]["name"] == "small_cnn" and header["config"] == {"name": "x"}
    assert len(header["codebook"]) == report.unique_values


def test_export_refuses_free_weights(pretrained_cnn, digits_config, digits, tmp_path):
    from pwf_core.bayes import to_bayesian

    to_bayesian(pretrained_cnn)
    with pytest.raises(ValueError, match="must be fixed"):
        export_compressed(
            pretrained_cnn, tmp_path / "m.safetensors", model_spec(digits_config, digits)
        )


BASELINES = {
    "wfn": {"method": "wfn"},
    "kmeans": {"method": "kmeans", "clusters": 16},
    "uniform": {"method": "uniform", "bits": 4},
}


def test_every_method_is_covered():
    assert set(method_names()) == {"pwfn", *BASELINES}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(BASELINES))
def test_baselines_run_through_the_same_driver(method, digits, pretrained_state):
    overrides = {"fixing": BASELINES[method], "train.epochs": 1.0}
    config = load_config(DEFAULT_CONFIG, overrides)
    model = build_experiment_model(config, digits)
    model.load_state_dict(pretrained_state[0])
    records = run_schedule(model, config, digits, "cpu", progress=False)
    assert all(set(r.metrics) == ROUND_KEYS for r in records)
    final = records[-1].metrics
    assert final["ws/fixed_fraction"] == 1.0
    assert final["cls/acc"] > 0.9
    limits = {"kmeans": 16, "uniform": 15}
    if method in limits:
        assert final["ws/unique_values"] <= limits[method]


@pytest.mark.slow
def test_fixed_weights_never_move_in_a_timm_model(digits):
    """A real timm network through training and fixing: fixed entries stay bit-exact."""
    config = load_config(
        DEFAULT_CONFIG,
        {
            "model.name": "test_resnet",
            "pretrain.epochs": 1,
            "train.epochs": 0.5,
            "fixing.schedule": [0.3, 0.6, 1.0],
        },
    )
    model = build_experiment_model(config, digits)
    snapshots: list[dict[str, torch.Tensor]] = []

    def check(record: RoundRecord) -> None:
        params = bayesian_params(model)
        for previous in snapshots:
            for param in params:
                was_fixed = previous[f"{param.name}.mask"]
                assert torch.equal(param.mu.detach()[was_fixed], previous[param.name][was_fixed])
        snapshots.append(
            {p.name: p.mu.detach().clone() for p in params}
            | {f"{p.name}.mask": p.fixed_mask.clone() for p in params}
        )

    records = run_schedule(model, config, digits, "cpu", progress=False, on_round_end=check)
    assert len(snapshots) == 3 and records[-1].metrics["ws/fixed_fraction"] == 1.0
