"""The addresses pwf writes into every link: where ``pwf ui`` serves a local store, a server's
own page otherwise, MLflow's pages in the model-training view (clicked in a browser by
``tests/test_ui.py``)."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from pwf_core.errors import ConfigError
from pwf_flows.links import (
    MLFLOW_UI,
    PREFECT_UI,
    TRAINING_VIEW,
    compare_url,
    experiment_url,
    optuna_trial_url,
    run_url,
    served_prefect_url,
)

LOCAL = "sqlite:////work/mlruns.db"


def test_a_local_store_links_to_pwf_ui_at_one_set_of_ports(monkeypatch):
    monkeypatch.delenv(MLFLOW_UI.env, raising=False)
    assert (
        run_url("1", "abc", LOCAL)
        == f"http://127.0.0.1:5000/#/experiments/1/runs/abc?{TRAINING_VIEW}"
    )
    monkeypatch.setenv(MLFLOW_UI.env, "5123")
    assert experiment_url("3", LOCAL) == f"http://127.0.0.1:5123/#/experiments/3?{TRAINING_VIEW}"
    monkeypatch.setenv("PWF_UI_OPTUNA_PORT", "8123")
    assert optuna_trial_url(2, 7) == "http://127.0.0.1:8123/dashboard/studies/2/trials?numbers=7"


def test_a_server_links_to_itself_without_credentials():
    uri = "https://admin:secret@mlflow.example:5443/"
    assert run_url("1", "abc", uri) == (
        f"https://mlflow.example:5443/#/experiments/1/runs/abc?{TRAINING_VIEW}"
    )


def test_the_comparison_names_its_runs_and_the_view():
    url = compare_url(["2", "2"], ["r1", "r2"], LOCAL)
    route, _, query = urlsplit(url).fragment.partition("?")
    fields = parse_qs(query)
    assert route == "/compare-runs" and fields["workflowType"] == ["machine_learning"]
    assert unquote(fields["runs"][0]) == '["r1","r2"]' and fields["experiments"] == ['["2"]']


@pytest.mark.parametrize("value", ["http", "0", "70000", "-1"])
def test_a_port_that_is_not_one_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv(PREFECT_UI.env, value)
    with pytest.raises(ConfigError, match=f"{PREFECT_UI.env}="):
        PREFECT_UI.port()


def test_old_temporary_server_links_move_to_pwf_ui(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(PREFECT_UI.env, "4300")
    old = "http://127.0.0.1:33167/flow-runs/flow-run/0fb3"
    assert served_prefect_url(old) == "http://127.0.0.1:4300/flow-runs/flow-run/0fb3"
    kept = ["http://127.0.0.1:4300/runs/flow-run/0fb3", "http://head:4200/runs/flow-run/0fb3"]
    assert [served_prefect_url(url) for url in kept] == kept
    assert served_prefect_url(None) is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:33167/api")  # a server of one's own
    assert served_prefect_url(old) == old
