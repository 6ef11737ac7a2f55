"""pwf orchestration: Prefect flows, MLflow tracking, Optuna sweeps and the ``pwf`` command.

Importing it changes nothing in the process: the ``pwf`` command, and each flow when it
starts on a worker, apply the offline-safe defaults of :mod:`pwf_flows.environment`.
"""
