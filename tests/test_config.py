from pathlib import Path

import pytest

from pwf_core.config import (
    ConfigError,
    apply_overrides,
    config_hash,
    dump_config,
    flatten_config,
    load_config,
    parse_config,
    parse_override_strings,
    recorded_params,
)
from tests.conftest import DEFAULT_CONFIG

BAD_VALUES = [
    ({"model": {"name": "resnet_does_not_exist"}}, "model.name", "unknown model"),
    (
        {"compression": {"schedule": [0.2, 0.6, 0.4, 1.0]}},
        "compression.schedule",
        "strictly increasing",
    ),
    ({"compression": {"schedule": [0.2, 0.2, 1.0]}}, "compression.schedule", "strictly increasing"),
    ({"compression": {"schedule": [0.2, 0.5, 0.9]}}, "compression.schedule", "end at 1.0"),
    ({"compression": {"reg": -0.001}}, "compression.reg", "greater than or equal to 0"),
    ({"compression": {"b": 0}}, "compression.b", "integer from 1 to 20, or 'auto'; got 0"),
    ({"compression": {"b": 40}}, "compression.b", "integer from 1 to 20, or 'auto'; got 40"),
    ({"data": {"name": "mnist", "path": "/no/such/folder"}}, "data.path", "does not exist"),
    ({"data": {"name": "cifar10"}}, "data", "data.path is required"),
    ({"train": {"batch_size": 0}}, "train.batch_size", "greater than 0"),
    ({"pretrain": {"batch_size": 0}}, "pretrain.batch_size", "greater than 0"),
    ({"compression": {"method": "magic"}}, "compression", "unknown method 'magic'"),
    ({"compression": {"inc": 1.0}}, "compression.inc", "greater than 1"),
    ({"compression": {"threshold": [1.0, 2.0]}}, "compression", "threshold has 2 values"),
    ({"compression": {"b": "big"}}, "compression.b", "or 'auto'; got 'big'"),
    ({"compression": {"reg": float("inf")}}, "compression.reg", "finite number"),
    ({"train": {"lr": float("nan")}}, "train.lr", "finite number"),
    ({"name": ""}, "name", "name is empty"),
    ({"name": "../../x"}, "name", "may only hold letters"),
    ({"name": "/abs/x"}, "name", "may only hold letters"),
    ({"name": "x" * 300}, "name", "300 characters long"),
    (
        {"compression": {"method": "kmeans", "clusters": 1}},
        "compression.clusters",
        "greater than or equal to 2",
    ),
    ({"model": {"weights": "/no/weights.safetensors"}}, "model.weights", "does not exist"),
    ({"device": "gpu7"}, "device", "not a torch device"),
    ({"trian": {"epochs": 1}}, "trian", "Extra inputs are not permitted"),
    (
        {"model": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 8, "patch_size": 2}}},
        "model.kwargs",
        "img_size comes from the dataset (its images' side: 8 for digits",
    ),
    ({"model": {"kwargs": {"num_classes": 3}}}, "model.kwargs", "num_classes comes from"),
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
    assert "train.batch_size" in str(err.value) and "compression.reg" in str(err.value)


def test_defaults_are_the_paper_setting():
    config = load_config()
    assert config.compression.method == "pwfn"
    assert config.compression.schedule == (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)
    assert config.compression.reg == 2**-11
    assert config.compression.b == 7 and config.compression.max_order == 4
    assert config.train.first_round_epochs == 0.05 and config.train.epochs == 3
    assert config.train.epochs_before(0) == 0.05 and config.train.epochs_before(4) == 3


def test_yaml_round_trip_and_overrides(tmp_path: Path):
    config = load_config(
        overrides={"compression.reg": 0.001, "seed": 3, "compression.method": "pwfn"}
    )
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    again = load_config(path)
    assert again == config
    assert config_hash(again) == config_hash(config)
    assert again.compression.reg == 0.001 and again.seed == 3


def test_method_sections_validate_their_own_fields():
    config = parse_config({"compression": {"method": "kmeans", "clusters": 16}})
    assert config.compression.clusters == 16
    with pytest.raises(ConfigError, match=r"compression\.reg"):
        parse_config({"compression": {"method": "kmeans", "reg": 0.1}})


def test_flatten_and_override_strings():
    flat = flatten_config(load_config())
    assert flat["compression.reg"] == 2**-11 and flat["model.name"] == "small_cnn"
    assert parse_override_strings(["compression.b=5", "model.name=resnet18"]) == {
        "compression.b": 5,
        "model.name": "resnet18",
    }
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        parse_override_strings(["nonsense"])


def test_recorded_params_leave_out_what_the_dataset_does_not_read(tmp_path: Path):
    digits = load_config()
    assert set(flatten_config(digits)) - set(recorded_params(digits)) == {
        "data.img_size",
        "data.num_workers",
    }
    folder = parse_config({"data": {"name": "imagefolder", "path": str(tmp_path), "img_size": 64}})
    assert recorded_params(folder) == flatten_config(folder)  # an image folder reads them all
    assert recorded_params(folder)["data.img_size"] == 64


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_fixing_is_read_as_the_old_name_of_compression():
    config = parse_config({"fixing": {"method": "kmeans", "clusters": 8}})
    assert config.compression.clusters == 8
    assert load_config(overrides={"fixing.b": 4}).compression.b == 4
    with pytest.raises(ConfigError, match="both 'compression' and 'fixing'"):
        parse_config({"fixing": {}, "compression": {}})


def test_switching_method_drops_the_other_methods_knobs(tmp_path: Path):
    shipped = load_config(DEFAULT_CONFIG)
    assert shipped.compression.method == "pwfn" and shipped.compression.b == "auto"
    wfn = load_config(DEFAULT_CONFIG, {"compression.method": "wfn"})
    assert wfn.compression.method == "wfn"
    assert wfn.compression.schedule[0] == 0.3  # WFN's own schedule, not PWFN's
    kmeans = load_config(
        DEFAULT_CONFIG, {"compression.clusters": 8, "compression.method": "kmeans"}
    )
    assert kmeans.compression.clusters == 8  # knobs given beside the switch apply to the new one
    same = load_config(DEFAULT_CONFIG, {"compression": {"method": "pwfn", "max_order": 2}})
    assert same.compression.max_order == 2 and same.compression.b == "auto"  # merged, kept


def test_mapping_overrides_merge_into_their_section():
    values = {"pretrain": {"lr": 0.1, "epochs": 5}, "train": {"epochs": 2}}
    merged = apply_overrides(values, {"pretrain": {"epochs": 1}, "train.lr": 0.01})
    assert merged["pretrain"] == {"lr": 0.1, "epochs": 1}
    assert merged["train"] == {"epochs": 2, "lr": 0.01}
    assert values["pretrain"]["epochs"] == 5  # the input is not edited


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.lr=.inf", "not a finite number"),
        ("train.lr=-.inf", "not a finite number"),
        ("train.lr=.nan", "not a finite number"),
        ("model.name=[unclosed", "not valid YAML"),
        ("=3", "section.field=value"),
    ],
)
def test_bad_override_strings(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_override_strings([item])


def test_empty_and_non_utf8_files(tmp_path: Path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin)
