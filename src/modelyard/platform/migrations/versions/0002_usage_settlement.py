"""Usage records: a settlement id (retries never charge twice), what went uncollected, and
whether the record was written without optional fields.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("usage", sa.Column("settlement_id", sa.String(32)))
    op.add_column("usage", sa.Column("uncollected", sa.BigInteger, nullable=False,
                                     server_default="0"))
    op.add_column("usage", sa.Column("degraded", sa.Boolean, nullable=False,
                                     server_default=sa.false()))
    op.create_index("ix_usage_settlement_id", "usage", ["settlement_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_usage_settlement_id", "usage")
    for column in ("degraded", "uncollected", "settlement_id"):
        op.drop_column("usage", column)
