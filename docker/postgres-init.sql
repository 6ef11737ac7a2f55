-- Databases beside Prefect's own (POSTGRES_DB): MLflow's backend store and Optuna's storage.
CREATE DATABASE mlflow OWNER pwf;
CREATE DATABASE optuna OWNER pwf;
