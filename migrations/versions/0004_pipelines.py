"""pipelines: pipelines, their steps and step jobs; jobs.outputs (named values a job produced)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 15:20:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.add_column('jobs', sa.Column('outputs', JSON, nullable=False, server_default=sa.text("'{}'")))
    op.create_table('pipelines',
    sa.Column('project_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('experiment', sa.String(length=128), nullable=False),
    sa.Column('template', sa.String(length=128), nullable=True),
    sa.Column('params', JSON, nullable=False),
    sa.Column('definition', JSON, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('retries', sa.Integer(), nullable=False),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
    sa.Column('mlflow_closed', sa.Boolean(), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_pipelines_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipelines'))
    )
    op.create_index('ix_pipelines_project_status', 'pipelines', ['project_id', 'status'], unique=False)
    op.create_table('pipeline_steps',
    sa.Column('pipeline_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('state_reason', sa.Text(), nullable=True),
    sa.Column('items', JSON, nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['pipeline_id'], ['pipelines.id'], name=op.f('fk_pipeline_steps_pipeline_id_pipelines'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipeline_steps')),
    sa.UniqueConstraint('pipeline_id', 'name', name=op.f('uq_pipeline_steps_pipeline_id'))
    )
    op.create_index(op.f('ix_pipeline_steps_pipeline_id'), 'pipeline_steps', ['pipeline_id'], unique=False)
    op.create_table('pipeline_jobs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('pipeline_id', sa.Uuid(), nullable=False),
    sa.Column('step_id', sa.Uuid(), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('item_index', sa.Integer(), nullable=True),
    sa.Column('current', sa.Boolean(), nullable=False),
    sa.Column('cached', sa.Boolean(), nullable=False),
    sa.Column('cache_key', sa.String(length=64), nullable=True),
    sa.Column('run_linked', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_pipeline_jobs_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['pipeline_id'], ['pipelines.id'], name=op.f('fk_pipeline_jobs_pipeline_id_pipelines'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['step_id'], ['pipeline_steps.id'], name=op.f('fk_pipeline_jobs_step_id_pipeline_steps'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipeline_jobs'))
    )
    op.create_index('ix_pipeline_jobs_cache_key', 'pipeline_jobs', ['cache_key'], unique=False)
    op.create_index(op.f('ix_pipeline_jobs_job_id'), 'pipeline_jobs', ['job_id'], unique=False)
    op.create_index(op.f('ix_pipeline_jobs_pipeline_id'), 'pipeline_jobs', ['pipeline_id'], unique=False)
    op.create_index(op.f('ix_pipeline_jobs_step_id'), 'pipeline_jobs', ['step_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_pipeline_jobs_step_id'), table_name='pipeline_jobs')
    op.drop_index(op.f('ix_pipeline_jobs_pipeline_id'), table_name='pipeline_jobs')
    op.drop_index(op.f('ix_pipeline_jobs_job_id'), table_name='pipeline_jobs')
    op.drop_index('ix_pipeline_jobs_cache_key', table_name='pipeline_jobs')
    op.drop_table('pipeline_jobs')
    op.drop_index(op.f('ix_pipeline_steps_pipeline_id'), table_name='pipeline_steps')
    op.drop_table('pipeline_steps')
    op.drop_index('ix_pipelines_project_status', table_name='pipelines')
    op.drop_table('pipelines')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('outputs')
