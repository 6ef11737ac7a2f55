"""Early stopping for sweeps of several objectives, and replicates' summaries: the rule on
hand-checkable points, a replay of recorded histories, and the intervals scipy gives."""

from __future__ import annotations

import datetime as dt
import math

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats

from pwf_core.config import ConfigError
from pwf_flows.sweep.early_stopping import Rule, dominating, mean_point, replay, rounds_key
from pwf_flows.sweep.replicates import summarise, summary_attrs, summary_metrics
from pwf_flows.sweep.spec import EarlyStoppingSpec, load_sweep
from tests.conftest import DEFAULT_CONFIG

ACC_UV = ["maximize", "minimize"]


def test_a_point_is_dominated_only_beyond_every_margin():
    point = (0.90, 40.0)
    others = {
        1: (0.95, 30.0),  # better in both
        2: (0.95, 40.0),  # better in accuracy, equal values: dominates with margin 0
        3: (0.99, 41.0),  # more values: does not
        4: (0.903, 20.0),  # better by only 0.3 pt: not beyond a 0.5 pt margin
        5: (0.90, 40.0),  # the same point: not strictly better anywhere
    }
    assert dominating(point, others, ACC_UV, [0.0, 0.0]) == [1, 2, 4]
    assert dominating(point, others, ACC_UV, [0.005, 0.0]) == [1, 2]
    assert dominating(point, others, ACC_UV, [0.005, 5.0]) == [1]


def _trial(number: int, rows: dict[int, list[list[float]]], start: int, end: int | None):
    base = dt.datetime(2026, 1, 1)
    trial = create_trial(
        params={"b": number},
        distributions={"b": IntDistribution(0, 100)},
        values=[rows[0][-1][0], rows[0][-1][1]] if end is not None else None,
        state=TrialState.COMPLETE if end is not None else TrialState.RUNNING,
        user_attrs={rounds_key(r): points for r, points in rows.items()},
    )
    trial.number = number
    trial.datetime_start = base + dt.timedelta(minutes=start)
    trial.datetime_complete = None if end is None else base + dt.timedelta(minutes=end)
    return trial


def test_the_rule_uses_the_mean_of_the_replicates_at_the_same_step():
    rule = Rule(
        EarlyStoppingSpec(from_round=2, min_dominating=2, margins={}), ["accuracy", "unique_values"]
    )
    strong = [_trial(n, {0: [[0.9, 30, 1.0], [0.95, 35, 2.0]]}, 0, 1) for n in (0, 1)]
    # two replicates: (0.80, 40) and (0.90, 60) at step 1 -> mean (0.85, 50)
    weak = _trial(
        2, {0: [[0.5, 9, 1.0], [0.80, 40, 2.0]], 1: [[0.5, 9, 1.0], [0.90, 60, 2.0]]}, 2, None
    )
    assert mean_point(weak, 1, 2) == pytest.approx((0.85, 50.0))
    assert not rule.decide((0.5, 9.0), 0, strong).stop  # before from_round
    decision = rule.decide(mean_point(weak, 1, 2), 1, strong)
    assert decision.stop and decision.by == (0, 1)
    assert not rule.decide(mean_point(weak, 1, 2), 1, strong[:1]).stop  # one is not enough
    for trial in strong:
        trial.set_user_attr("steps", 2)  # two-round schedules: not compared with five rounds
    assert rule.decide(mean_point(weak, 1, 2), 1, strong, steps=2).stop
    assert not rule.decide(mean_point(weak, 1, 2), 1, strong, steps=5).stop


def test_replay_stops_what_the_rule_would_have_stopped_and_counts_the_compute():
    study = optuna.create_study(directions=ACC_UV)
    good = {0: [[0.90, 30, 1.0], [0.95, 30, 2.0], [0.97, 32, 3.0]]}
    bad = {0: [[0.80, 50, 1.5], [0.85, 50, 3.0], [0.86, 55, 4.5]]}
    # Trial 1 started before trial 0 completed: nothing to compare with, it runs to its end.
    # Trial 2 started after both: at round 2 trial 0 beats it (trial 1 only ties), so it
    # stops there, saving its last round's compute (4.5 - 3.0 s).
    trials = [_trial(0, good, 0, 10), _trial(1, bad, 5, 15), _trial(2, bad, 20, 30)]
    for trial in trials:
        study.add_trial(trial)
    rule = Rule(
        EarlyStoppingSpec(from_round=2, min_dominating=1, margins={}), ["accuracy", "unique_values"]
    )
    result = replay(study, rule)
    assert result.stopped == {2: (2, (0,))}
    assert result.replayed == 3
    assert result.compute_s == pytest.approx(3.0 + 4.5 + 4.5)
    assert result.saved_s == pytest.approx(4.5 - 3.0)
    assert result.lost_pareto == []  # the front is trial 0 alone


def test_replicates_are_summarised_with_the_student_t_interval():
    values = [0.90, 0.92, 0.94]
    (summary,) = summarise([{"cls/acc": v} for v in values]).values()
    low, high = stats.t.interval(0.95, 2, loc=0.92, scale=stats.sem(values))
    assert summary.mean == pytest.approx(0.92)
    assert summary.sd == pytest.approx(0.02)
    assert (summary.low, summary.high) == pytest.approx((low, high))
    assert summary.high - summary.mean == pytest.approx(4.302652729911275 * 0.02 / math.sqrt(3))
    assert summary_attrs("accuracy", summary)["accuracy_ci95"] == pytest.approx([low, high])
    assert summary_metrics("final/cls/acc", summary)["final/cls/acc/ci_high"] == pytest.approx(high)
    (single,) = summarise([{"cls/acc": 0.9}]).values()
    assert single.n == 1 and math.isnan(single.sd)
    assert summary_attrs("accuracy", single)["accuracy_ci95"] is None
    both = summarise([{"cls/acc": 0.9, "x": 1.0}, {"cls/acc": 0.8}])
    assert set(both) == {"cls/acc"} and both["cls/acc"].n == 2


def test_early_stopping_and_replicates_are_validated_with_the_sweep(tmp_path):
    def sweep(study: str) -> object:
        path = tmp_path / "sweep.yaml"
        path.write_text(
            f"name: s\nbase: {DEFAULT_CONFIG}\nspace:\n  compression.b: {{int: [4, 6]}}\n"
            f"study:\n  n_trials: 2\n  storage: sqlite:///{tmp_path / 'o.db'}\n{study}"
        )
        return load_sweep(path)

    spec = sweep("  replicates: 3\n  early_stopping: {from_round: 2}\n")
    assert spec.study.replicates == 3 and spec.study.early_stopping.min_dominating == 2
    assert spec.trial_config({"compression.b": 5}, 2).replicate.index == 2
    with pytest.raises(ConfigError, match="margins"):
        sweep("  early_stopping: {margins: {nll: 0.1}}\n")
    with pytest.raises(ConfigError, match="replicates"):
        sweep("  replicates: 0\n")


def test_pwf_sweep_replay_prints_what_the_rule_would_have_stopped(tmp_path, capsys):
    from pwf_flows.cli import main as pwf_main

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=ACC_UV)
    good = {0: [[0.90, 30, 1.0], [0.95, 30, 2.0], [0.97, 32, 3.0]]}
    bad = {0: [[0.80, 50, 1.5], [0.85, 50, 3.0], [0.86, 55, 4.5]]}
    for trial in (_trial(0, good, 0, 10), _trial(1, bad, 20, 30)):
        study.add_trial(trial)
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"name: s\nbase: {DEFAULT_CONFIG}\nspace:\n  compression.b: {{int: [4, 6]}}\n"
        f"study:\n  n_trials: 2\n  storage: {storage}\n"
        "  early_stopping: {from_round: 2, min_dominating: 1, margins: {accuracy: 0.01}}\n"
    )
    assert pwf_main(["sweep", str(path), "--replay"]) == 0
    out = capsys.readouterr().out
    assert "the sweep's rule (from round 2, beaten by at least 1 completed trials" in out
    assert "trial 1: stopped after round 2, beaten by trials [0]" in out
    assert "compute: 8 s recorded, 2 s saved (20 %); no Pareto-optimal trial lost" in out


def test_the_projected_count_is_what_fixing_every_free_weight_now_would_leave():
    import torch

    from pwf_core.methods.rounds import FlatWeights, projected_values

    mu = torch.tensor([0.30, 0.26, 0.50, 0.01, -0.49])
    fixed = torch.tensor([False, False, True, False, False])
    weights = FlatWeights(mu, torch.ones(5), fixed)
    centres = torch.tensor([-0.5, 0.0, 0.25, 0.5])
    # 0.30 and 0.26 -> 0.25, 0.01 -> 0, -0.49 -> -0.5, and the fixed 0.5: four values
    assert projected_values(weights, centres) == 4
    assert (
        projected_values(FlatWeights(mu, torch.ones(5), torch.ones(5, dtype=torch.bool)), centres)
        == 5
    )
