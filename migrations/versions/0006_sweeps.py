"""sweeps: sweeps and their trials; optuna's study tables (its RDB schema, pinned optuna 4.6); jobs.stop_reason
and the terminal job status "pruned"

optuna's tables are made here, not by optuna (services/sweeps/study.py opens its RDBStorage with table creation
and its own alembic off): Crucible's migrations stay the only way tables are made.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 18:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
STATUSES = ('pending', 'queued', 'dispatched', 'running', 'succeeded', 'failed', 'cancelled')
OPTUNA_ENUMS = ('studydirection', 'trialstate', 'trialintermediatevaluetype', 'trialvaluetype')


def _job_statuses(statuses: tuple[str, ...]) -> None:
    listed = ", ".join(f"'{s}'" for s in statuses)
    with op.batch_alter_table('jobs') as batch:
        batch.drop_constraint(op.f('ck_jobs_job_status'), type_='check')
        batch.create_check_constraint(op.f('ck_jobs_job_status'), sa.text(f"status IN ({listed})"))


def upgrade() -> None:
    op.create_table('studies',
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('study_name', sa.String(length=512), nullable=False),
    sa.PrimaryKeyConstraint('study_id', name=op.f('pk_studies'))
    )
    op.create_index(op.f('ix_studies_study_name'), 'studies', ['study_name'], unique=True)
    op.create_table('version_info',
    sa.Column('version_info_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('schema_version', sa.Integer(), nullable=True),
    sa.Column('library_version', sa.String(length=256), nullable=True),
    sa.CheckConstraint('version_info_id=1', name=op.f('ck_version_info_0')),
    sa.PrimaryKeyConstraint('version_info_id', name=op.f('pk_version_info'))
    )
    op.create_table('study_directions',
    sa.Column('study_direction_id', sa.Integer(), nullable=False),
    sa.Column('direction', sa.Enum('NOT_SET', 'MINIMIZE', 'MAXIMIZE', name='studydirection'), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('objective', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.study_id'], name=op.f('fk_study_directions_study_id_studies')),
    sa.PrimaryKeyConstraint('study_direction_id', name=op.f('pk_study_directions')),
    sa.UniqueConstraint('study_id', 'objective', name=op.f('uq_study_directions_study_id'))
    )
    op.create_table('study_system_attributes',
    sa.Column('study_system_attribute_id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=True),
    sa.Column('key', sa.String(length=512), nullable=True),
    sa.Column('value_json', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['studies.study_id'], name=op.f('fk_study_system_attributes_study_id_studies')),
    sa.PrimaryKeyConstraint('study_system_attribute_id', name=op.f('pk_study_system_attributes')),
    sa.UniqueConstraint('study_id', 'key', name=op.f('uq_study_system_attributes_study_id'))
    )
    op.create_table('study_user_attributes',
    sa.Column('study_user_attribute_id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=True),
    sa.Column('key', sa.String(length=512), nullable=True),
    sa.Column('value_json', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['studies.study_id'], name=op.f('fk_study_user_attributes_study_id_studies')),
    sa.PrimaryKeyConstraint('study_user_attribute_id', name=op.f('pk_study_user_attributes')),
    sa.UniqueConstraint('study_id', 'key', name=op.f('uq_study_user_attributes_study_id'))
    )
    op.create_table('sweeps',
    sa.Column('project_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('experiment', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('definition', JSON, nullable=False),
    sa.Column('max_trials', sa.Integer(), nullable=False),
    sa.Column('max_concurrency', sa.Integer(), nullable=False),
    sa.Column('study_name', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('settled', sa.Boolean(), nullable=False),
    sa.Column('best', JSON, nullable=False),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
    sa.Column('mlflow_closed', sa.Boolean(), nullable=False),
    sa.Column('mlflow_best_logged', sa.Integer(), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_sweeps_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sweeps')),
    sa.UniqueConstraint('study_name', name=op.f('uq_sweeps_study_name'))
    )
    op.create_index('ix_sweeps_project_status', 'sweeps', ['project_id', 'status'], unique=False)
    op.create_index('ix_sweeps_settled', 'sweeps', ['settled'], unique=False)
    op.create_table('trials',
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=True),
    sa.Column('study_id', sa.Integer(), nullable=True),
    sa.Column('state', sa.Enum('RUNNING', 'COMPLETE', 'PRUNED', 'FAIL', 'WAITING', name='trialstate'), nullable=False),
    sa.Column('datetime_start', sa.DateTime(), nullable=True),
    sa.Column('datetime_complete', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['studies.study_id'], name=op.f('fk_trials_study_id_studies')),
    sa.PrimaryKeyConstraint('trial_id', name=op.f('pk_trials'))
    )
    op.create_index(op.f('ix_trials_study_id'), 'trials', ['study_id'], unique=False)
    op.create_table('trial_heartbeats',
    sa.Column('trial_heartbeat_id', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('heartbeat', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['trial_id'], ['trials.trial_id'], name=op.f('fk_trial_heartbeats_trial_id_trials')),
    sa.PrimaryKeyConstraint('trial_heartbeat_id', name=op.f('pk_trial_heartbeats')),
    sa.UniqueConstraint('trial_id', name=op.f('uq_trial_heartbeats_trial_id'))
    )
    op.create_table('trial_intermediate_values',
    sa.Column('trial_intermediate_value_id', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('intermediate_value', sa.Float(precision=53), nullable=True),
    sa.Column('intermediate_value_type', sa.Enum('FINITE', 'INF_POS', 'INF_NEG', 'NAN', name='trialintermediatevaluetype'), nullable=False),
    sa.ForeignKeyConstraint(['trial_id'], ['trials.trial_id'], name=op.f('fk_trial_intermediate_values_trial_id_trials')),
    sa.PrimaryKeyConstraint('trial_intermediate_value_id', name=op.f('pk_trial_intermediate_values')),
    sa.UniqueConstraint('trial_id', 'step', name=op.f('uq_trial_intermediate_values_trial_id'))
    )
    op.create_table('trial_params',
    sa.Column('param_id', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=True),
    sa.Column('param_name', sa.String(length=512), nullable=True),
    sa.Column('param_value', sa.Float(precision=53), nullable=True),
    sa.Column('distribution_json', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['trial_id'], ['trials.trial_id'], name=op.f('fk_trial_params_trial_id_trials')),
    sa.PrimaryKeyConstraint('param_id', name=op.f('pk_trial_params')),
    sa.UniqueConstraint('trial_id', 'param_name', name=op.f('uq_trial_params_trial_id'))
    )
    op.create_table('trial_system_attributes',
    sa.Column('trial_system_attribute_id', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=True),
    sa.Column('key', sa.String(length=512), nullable=True),
    sa.Column('value_json', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['trial_id'], ['trials.trial_id'], name=op.f('fk_trial_system_attributes_trial_id_trials')),
    sa.PrimaryKeyConstraint('trial_system_attribute_id', name=op.f('pk_trial_system_attributes')),
    sa.UniqueConstraint('trial_id', 'key', name=op.f('uq_trial_system_attributes_trial_id'))
    )
    op.create_table('trial_user_attributes',
    sa.Column('trial_user_attribute_id', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=True),
    sa.Column('key', sa.String(length=512), nullable=True),
    sa.Column('value_json', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['trial_id'], ['trials.trial_id'], name=op.f('fk_trial_user_attributes_trial_id_trials')),
    sa.PrimaryKeyConstraint('trial_user_attribute_id', name=op.f('pk_trial_user_attributes')),
    sa.UniqueConstraint('trial_id', 'key', name=op.f('uq_trial_user_attributes_trial_id'))
    )
    op.create_table('trial_values',
    sa.Column('trial_value_id', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('objective', sa.Integer(), nullable=False),
    sa.Column('value', sa.Float(precision=53), nullable=True),
    sa.Column('value_type', sa.Enum('FINITE', 'INF_POS', 'INF_NEG', name='trialvaluetype'), nullable=False),
    sa.ForeignKeyConstraint(['trial_id'], ['trials.trial_id'], name=op.f('fk_trial_values_trial_id_trials')),
    sa.PrimaryKeyConstraint('trial_value_id', name=op.f('pk_trial_values')),
    sa.UniqueConstraint('trial_id', 'objective', name=op.f('uq_trial_values_trial_id'))
    )
    op.create_table('sweep_trials',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('sweep_id', sa.Uuid(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('optuna_trial_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=True),
    sa.Column('params', JSON, nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('last_step', sa.Integer(), nullable=True),
    sa.Column('last_value', sa.Float(), nullable=True),
    sa.Column('event_cursor', sa.Integer(), nullable=False),
    sa.Column('run_linked', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_sweep_trials_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['sweep_id'], ['sweeps.id'], name=op.f('fk_sweep_trials_sweep_id_sweeps'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sweep_trials')),
    sa.UniqueConstraint('sweep_id', 'number', name=op.f('uq_sweep_trials_sweep_id'))
    )
    op.create_index(op.f('ix_sweep_trials_job_id'), 'sweep_trials', ['job_id'], unique=False)
    op.create_index(op.f('ix_sweep_trials_sweep_id'), 'sweep_trials', ['sweep_id'], unique=False)
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('stop_reason', sa.String(length=16), nullable=True))
    _job_statuses((*STATUSES, 'pruned'))



def downgrade() -> None:
    op.execute("UPDATE jobs SET status = 'cancelled' WHERE status = 'pruned'")
    _job_statuses(STATUSES)
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('stop_reason')

    op.drop_index(op.f('ix_sweep_trials_sweep_id'), table_name='sweep_trials')
    op.drop_index(op.f('ix_sweep_trials_job_id'), table_name='sweep_trials')
    op.drop_table('sweep_trials')
    op.drop_table('trial_values')
    op.drop_table('trial_user_attributes')
    op.drop_table('trial_system_attributes')
    op.drop_table('trial_params')
    op.drop_table('trial_intermediate_values')
    op.drop_table('trial_heartbeats')
    op.drop_index(op.f('ix_trials_study_id'), table_name='trials')
    op.drop_table('trials')
    op.drop_index('ix_sweeps_settled', table_name='sweeps')
    op.drop_index('ix_sweeps_project_status', table_name='sweeps')
    op.drop_table('sweeps')
    op.drop_table('study_user_attributes')
    op.drop_table('study_system_attributes')
    op.drop_table('study_directions')
    op.drop_table('version_info')
    op.drop_index(op.f('ix_studies_study_name'), table_name='studies')
    op.drop_table('studies')
    if op.get_bind().dialect.name == 'postgresql':
        for name in OPTUNA_ENUMS:
            op.execute(f'DROP TYPE IF EXISTS {name}')
