"""Database access (SQLAlchemy Core): alert history, actions, silences, series, small state."""

from .database import SCHEMA_VERSION, Database, DatabaseUnavailable, Fenced

__all__ = ["SCHEMA_VERSION", "Database", "DatabaseUnavailable", "Fenced"]
