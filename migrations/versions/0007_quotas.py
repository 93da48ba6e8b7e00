"""quotas: per-project scheduling limits; jobs' pool, wait reason and preemption flag; dispatcher indexes

Revision ID: 0007_quotas
Revises: 0006_sweeps
Create Date: 2026-12-01 18:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007_quotas'
down_revision: str | None = '0006_sweeps'  # the sweeps branch's migration; tested locally on '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('project_quotas',
    sa.Column('project_id', sa.Uuid(), nullable=False),
    sa.Column('max_gpus', sa.Integer(), nullable=True),
    sa.Column('max_jobs', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_project_quotas_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('project_id', name=op.f('pk_project_quotas'))
    )
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('preempt_requested', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column('pool', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('wait_reason', sa.Text(), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.alter_column('preempt_requested', server_default=None)
    if op.get_bind().dialect.name == 'postgresql':  # the dispatcher's heads; SQLite ranks with ROW_NUMBER
        op.create_index('ix_jobs_queued_heads', 'jobs', ['project_id', 'worker_kind', sa.text('priority DESC'), 'queued_at', 'id'],
                        unique=False, postgresql_where=sa.text("status = 'queued'"))
    op.create_index('ix_jobs_finished_at', 'jobs', ['finished_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_finished_at', table_name='jobs')
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index('ix_jobs_queued_heads', table_name='jobs')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('wait_reason')
        batch.drop_column('pool')
        batch.drop_column('preempt_requested')
    op.drop_table('project_quotas')
