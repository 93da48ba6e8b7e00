"""storage grants: object-store prefixes a project may register as datasets

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 15:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('storage_grants',
    sa.Column('project_id', sa.Uuid(), nullable=False),
    sa.Column('bucket', sa.String(length=63), nullable=False),
    sa.Column('prefix', sa.String(length=1024), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_storage_grants_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_storage_grants')),
    sa.UniqueConstraint('project_id', 'bucket', 'prefix', name=op.f('uq_storage_grants_project_id'))
    )
    op.create_index(op.f('ix_storage_grants_project_id'), 'storage_grants', ['project_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_storage_grants_project_id'), table_name='storage_grants')
    op.drop_table('storage_grants')
