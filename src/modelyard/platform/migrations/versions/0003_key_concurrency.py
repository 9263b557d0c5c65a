"""API keys: their own limit of requests in flight (None: the configured default).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("max_concurrent", sa.Integer))


def downgrade() -> None:
    op.drop_column("api_keys", "max_concurrent")
