"""Sweep files: validation before anything runs, and the mapping of the space onto configs."""

from pathlib import Path

import pytest
import yaml

from pwf_core.config import ConfigError
from pwf_flows.sweep.spec import dump_spec, load_sweep, masked_url
from tests.conftest import DEFAULT_CONFIG, ROOT

SHIPPED = sorted((ROOT / "sweeps").rglob("*.yaml"))


# The papers' grids, point by point: model x b (PWFN on ImageNet), K x tau_d (2DGBNN).
PAPER_GRIDS = {"pwfn-imagenet.yaml": 5 * 3, "2dgbnn-cifar10.yaml": 3 * 4}


def local_files(path: Path, folder: Path) -> dict:
    """Overrides that point a paper's sweep at files that exist (its data folder and weights,
    empty here: validation checks that they are there, the runs read them)."""
    values = yaml.safe_load(path.read_text())
    fields = {"overrides.data.path": str(folder)}
    (folder / "weights").touch()
    if yaml.safe_load((path.parent / values["base"]).read_text())["model"].get("weights"):
        fields["overrides.model.weights"] = str(folder / "weights")
    for label in values["space"].get("model", {}).get("choices", {}):
        fields[f"space.model.choices.{label}.weights"] = str(folder / "weights")
    return fields


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_sweeps_validate(path: Path, tmp_path: Path):
    papers = path.parent.name == "papers"
    spec = load_sweep(path, local_files(path, tmp_path) if papers else None)
    assert spec.n_trials >= 2
    if "ablations" in path.parts or path.name == "methods.yaml":
        assert spec.sampler == "grid" and len(spec.space) <= 2
    if papers:
        assert spec.sampler == "grid" and spec.n_trials == PAPER_GRIDS[path.name]


def write_sweep(tmp_path: Path, **fields) -> Path:
    values = {
        "name": "t",
        "base": str(DEFAULT_CONFIG),
        "space": {"compression.reg": {"float": [1e-5, 1e-2], "log": True}},
        "study": {"n_trials": 3, "storage": f"sqlite:///{tmp_path / 'optuna.db'}"},
    }
    for key, value in fields.items():
        values[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


BAD = [
    (
        {"space": {"compression.nope": {"choices": [1, 2]}}},
        "space.compression.nope = 1: compression.nope: Extra",
    ),
    ({"space": {"trian.epochs": {"int": [1, 3]}}}, "space.trian.epochs = 1: trian: Extra"),
    (
        {"space": {"compression.b": {"int": [0, 5]}}},
        "space.compression.b = 0: compression.b: must be an integer from 1 to 20",
    ),
    ({"space": {"compression.reg": {"float": [0.01, 0.01]}}}, "space.compression.reg: empty range"),
    ({"space": {"compression.reg": {"float": [0.0, 0.1], "log": True}}}, "log range needs low > 0"),
    ({"space": {"compression.b": {"choices": []}}}, "space.compression.b: choices is empty"),
    ({"space": {"compression.b": {"choices": [[1], [2]]}}}, "are not scalars"),
    ({"space": {"compression.b": {"int": [4, 6], "choices": [4]}}}, "exactly one of"),
    ({"space": {}}, "space: the search space is empty"),
    (
        {"study": {"n_trials": 3, "storage": "not a url"}},
        "study.storage: 'not a url' is not a database URL",
    ),
    ({"study": {"n_trials": 3, "storage": "redis://localhost/0"}}, "must be one of sqlite"),
    ({"study": {"n_trials": 3, "storage": "sqlite:////no/such/dir/o.db"}}, "does not exist"),
    ({"study": {"n_trials": 0}}, "study.n_trials: Input should be greater than 0"),
    ({"study": {"objectives": ["speed"]}}, "study.objectives.0"),
    ({"base": "/no/base.yaml"}, "base: '/no/base.yaml' does not exist"),
    ({"trials": 3}, "trials: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_bad_sweeps_fail_with_the_field_named(tmp_path, fields, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path, **fields))
    assert message in str(err.value), str(err.value)


def test_space_maps_onto_config_fields(tmp_path):
    space = {
        "compression.reg": {"float": [1e-5, 1e-2], "log": True},
        "compression.b": {"int": [4, 7]},
        "compression.schedule": {"choices": {"short": [0.5, 1.0], "paper": [0.2, 1.0]}},
    }
    spec = load_sweep(write_sweep(tmp_path, space=space, overrides={"train.epochs": 1}))
    config = spec.trial_config(
        {"compression.reg": 0.001, "compression.b": 5, "compression.schedule": "short"}
    )
    assert config.compression.reg == 0.001 and config.compression.b == 5
    assert config.compression.schedule == (0.5, 1.0)
    assert config.train.epochs == 1 and config.name == "t"  # overrides and the sweep's name


def test_methods_sweep_swaps_whole_method_sections():
    spec = load_sweep(ROOT / "sweeps" / "methods.yaml")
    methods = {
        label: spec.trial_config({"compression": label}).compression
        for label in spec.grid()["compression"]
    }
    assert {label: m.method for label, m in methods.items()} == {
        label: label.split()[0] for label in methods
    }
    assert len(methods) == 20  # five methods at four budgets each
    assert spec.study.replicates == 3 and spec.report.reference == "pwfn"
    assert methods["wfn b=5 d=0.1"].schedule[0] == 0.3  # WFN's own schedule, not PWFN's
    assert (methods["wfn b=5 d=0.1"].b, methods["wfn b=5 d=0.1"].delta) == (5, 0.1)
    assert methods["pwfn b=5 o=2"].max_order == 2


def test_dotted_overrides_merge_into_the_sweeps_own_overrides(tmp_path):
    path = write_sweep(tmp_path, overrides={"pretrain": {"lr": 0.2, "epochs": 9}})
    spec = load_sweep(path, {"overrides.pretrain.epochs": 1})
    config = spec.trial_config({"compression.reg": 0.001})
    assert config.pretrain.epochs == 1 and config.pretrain.lr == 0.2


def test_credentials_are_masked_wherever_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("PWF_TEST_PASSWORD", "hunter2")
    study = {"n_trials": 2, "storage": "postgresql://pwf:${PWF_TEST_PASSWORD}@db:5432/optuna"}
    spec = load_sweep(write_sweep(tmp_path, study=study))
    assert spec.study.resolved_storage() == "postgresql://pwf:hunter2@db:5432/optuna"
    literal = load_sweep(
        write_sweep(tmp_path, study={"n_trials": 2, "storage": "postgresql://u:s3cret@db/o"})
    )
    for shown in (dump_spec(spec), dump_spec(literal), masked_url(literal.study.storage)):
        assert "hunter2" not in shown and "s3cret" not in shown
    assert masked_url(literal.study.storage) == "postgresql://u:***@db/o"
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path, study={"n_trials": 2, "storage": "redis://u:s3cret@x"}))
    assert "s3cret" not in str(err.value) and "***" in str(err.value)


def test_overrides_and_auto_sampler(tmp_path):
    path = write_sweep(tmp_path)
    assert load_sweep(path).sampler == "nsga2"
    single = load_sweep(path, {"study.objectives": ["accuracy"], "study.n_trials": 5})
    assert single.sampler == "tpe" and single.n_trials == 5
    assert single.study.directions == ["maximize"]
