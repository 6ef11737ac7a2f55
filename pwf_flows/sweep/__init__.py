"""Optuna sweeps of pwf experiments.

:mod:`~pwf_flows.sweep.spec` reads and validates sweep files (nothing heavy: the ``pwf``
command checks a file before it imports Optuna or Prefect); :mod:`~pwf_flows.sweep.study` opens
the study, asks and tells; :mod:`~pwf_flows.sweep.trials` keeps trials alive across processes
and waits out outages of the study's database; :mod:`~pwf_flows.sweep.driver` runs trials here
or on a work pool; :mod:`~pwf_flows.sweep.report` turns the study into its table, front and
summary; :mod:`~pwf_flows.sweep.flow` is the ``pwf`` flow that wires them.
"""
