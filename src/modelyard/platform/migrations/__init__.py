"""Alembic migrations of the platform's tables; `modelyard.platform.database` runs them."""
