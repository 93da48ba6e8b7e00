-- Runs once, on an empty data directory: MLflow keeps its tables (and its own Alembic history) apart from ours.
CREATE DATABASE mlflow OWNER crucible;
