"""The ``pwf-experiment`` flow: pretrain → prepare → step × N → evaluate.

:mod:`~pwf_flows.experiment.tasks` holds the Prefect tasks, thin calls into
:class:`pwf_core.Compression` (the same code path as :func:`pwf_core.compress`);
:mod:`~pwf_flows.experiment.flow` wires them, resumes a stopped run and records it in MLflow;
:mod:`~pwf_flows.experiment.summary` says what a run is and shows its steps.
"""

from pwf_flows.experiment.flow import pwf_experiment
from pwf_flows.experiment.summary import default_run_name

__all__ = ["default_run_name", "pwf_experiment"]
