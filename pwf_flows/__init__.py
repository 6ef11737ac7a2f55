"""pwf orchestration: Prefect flows, MLflow tracking, Optuna sweeps and the ``pwf`` command.

Importing this package applies offline-safe defaults before Prefect and MLflow load.
"""

from pwf_flows.environment import configure_environment

configure_environment()
