"""The web console: its sessions, daily usage totals, and indexes for its account-scoped
pages (a page of an account's records, newest first).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(12), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_console_sessions_key_id", "console_sessions", ["key_id"])
    op.create_index("ix_console_sessions_expires_at", "console_sessions", ["expires_at"])
    op.create_table(
        "usage_daily",
        sa.Column("account_id", sa.String(32), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("key_id", sa.String(12), primary_key=True),
        *(sa.Column(name, sa.BigInteger, nullable=False)
          for name in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens",
                       "reasoning_tokens", "cost", "uncollected")),
    )
    op.create_index("ix_usage_daily_day", "usage_daily", ["day"])
    op.create_table(
        "usage_rollup",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("last_id", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO usage_rollup (id, last_id) VALUES (1, 0)")
    # An account's records newest first (the request log), without a scan of everyone's.
    op.create_index("ix_usage_account_id_id", "usage", ["account_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_usage_account_id_id", "usage")
    op.drop_table("usage_rollup")
    op.drop_index("ix_usage_daily_day", "usage_daily")
    op.drop_table("usage_daily")
    op.drop_index("ix_console_sessions_expires_at", "console_sessions")
    op.drop_index("ix_console_sessions_key_id", "console_sessions")
    op.drop_table("console_sessions")
