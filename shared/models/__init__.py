"""SQLAlchemy 2 typed models. Importing this package registers every table on ``Base.metadata``
(Alembic's env.py and the model/migration agreement test rely on that)."""

from shared.models.artifacts import Artifact, ArtifactParent, Dataset
from shared.models.base import Base, utcnow
from shared.models.jobs import ACTIVE, TERMINAL, Job, JobDependency, JobEvent, JobStatus, Outbox, Worker
from shared.models.pipelines import Pipeline, PipelineJob, PipelineStep
from shared.models.projects import ApiKey, Experiment, Project
from shared.models.quotas import ProjectQuota
from shared.models.storage import StorageGrant
from shared.models.sweeps import OPTUNA_TABLES, Sweep, SweepTrial
from shared.models.webhooks import Webhook, WebhookDelivery

__all__ = [
    "ACTIVE", "TERMINAL", "ApiKey", "Artifact", "ArtifactParent", "Base", "Dataset", "Experiment", "Job",
    "JobDependency", "JobEvent", "JobStatus", "Outbox", "Pipeline", "PipelineJob", "PipelineStep", "Project",
    "OPTUNA_TABLES", "ProjectQuota", "StorageGrant", "Sweep", "SweepTrial", "Webhook", "WebhookDelivery", "Worker",
    "utcnow",
]
