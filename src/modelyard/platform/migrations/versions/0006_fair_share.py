"""Fair share of the built-in engines: an account's weight (None: 1) and an API key's
priority among its account's requests (None: 0).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("weight", sa.Float))
    op.add_column("api_keys", sa.Column("priority", sa.Integer))


def downgrade() -> None:
    op.drop_column("api_keys", "priority")
    op.drop_column("accounts", "weight")
