"""Metrics, logs and (later) traces and alerting."""
