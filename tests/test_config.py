from pathlib import Path

import pytest

from pwf_core.config import (
    ConfigError,
    config_hash,
    dump_config,
    flatten_config,
    load_config,
    parse_config,
    parse_override_strings,
)

BAD_VALUES = [
    ({"model": {"name": "resnet_does_not_exist"}}, "model.name", "unknown model"),
    ({"fixing": {"schedule": [0.2, 0.6, 0.4, 1.0]}}, "fixing.schedule", "strictly increasing"),
    ({"fixing": {"schedule": [0.2, 0.2, 1.0]}}, "fixing.schedule", "strictly increasing"),
    ({"fixing": {"schedule": [0.2, 0.5, 0.9]}}, "fixing.schedule", "end at 1.0"),
    ({"fixing": {"reg": -0.001}}, "fixing.reg", "greater than or equal to 0"),
    ({"fixing": {"b": 0}}, "fixing.b", "greater than or equal to 1"),
    ({"fixing": {"b": 40}}, "fixing.b", "less than or equal to 20"),
    ({"data": {"name": "mnist", "path": "/no/such/folder"}}, "data.path", "does not exist"),
    ({"data": {"name": "cifar10"}}, "data", "data.path is required"),
    ({"train": {"batch_size": 0}}, "train.batch_size", "greater than 0"),
    ({"pretrain": {"batch_size": 0}}, "pretrain.batch_size", "greater than 0"),
    ({"fixing": {"method": "magic"}}, "fixing", "unknown fixing method 'magic'"),
    ({"fixing": {"inc": 1.0}}, "fixing.inc", "greater than 1"),
    ({"fixing": {"threshold": [1.0, 2.0]}}, "fixing", "threshold has 2 values"),
    (
        {"fixing": {"method": "kmeans", "clusters": 1}},
        "fixing.clusters",
        "greater than or equal to 2",
    ),
    ({"model": {"weights": "/no/weights.safetensors"}}, "model.weights", "does not exist"),
    ({"device": "gpu7"}, "device", "not a torch device"),
    ({"trian": {"epochs": 1}}, "trian", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("values", "field", "message"), BAD_VALUES)
def test_bad_value_names_its_field(values, field, message):
    with pytest.raises(ConfigError) as err:
        parse_config(values)
    text = str(err.value)
    assert f"  {field}: " in text, text
    assert message in text, text


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config({"train": {"batch_size": 0}, "fixing": {"reg": -1}})
    assert "train.batch_size" in str(err.value) and "fixing.reg" in str(err.value)


def test_defaults_are_the_paper_setting():
    config = load_config()
    assert config.fixing.method == "pwfn"
    assert config.fixing.schedule == (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)
    assert config.fixing.reg == 2**-11
    assert config.fixing.b == 7 and config.fixing.max_order == 4
    assert config.train.first_round_epochs == 0.05 and config.train.epochs == 3
    assert config.train.epochs_before(0) == 0.05 and config.train.epochs_before(4) == 3


def test_yaml_round_trip_and_overrides(tmp_path: Path):
    config = load_config(overrides={"fixing.reg": 0.001, "seed": 3, "fixing.method": "pwfn"})
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    again = load_config(path)
    assert again == config
    assert config_hash(again) == config_hash(config)
    assert again.fixing.reg == 0.001 and again.seed == 3


def test_method_sections_validate_their_own_fields():
    config = parse_config({"fixing": {"method": "kmeans", "clusters": 16}})
    assert config.fixing.clusters == 16
    with pytest.raises(ConfigError, match=r"fixing\.reg"):
        parse_config({"fixing": {"method": "kmeans", "reg": 0.1}})


def test_flatten_and_override_strings():
    flat = flatten_config(load_config())
    assert flat["fixing.reg"] == 2**-11 and flat["model.name"] == "small_cnn"
    assert parse_override_strings(["fixing.b=5", "model.name=resnet18"]) == {
        "fixing.b": 5,
        "model.name": "resnet18",
    }
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        parse_override_strings(["nonsense"])


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
