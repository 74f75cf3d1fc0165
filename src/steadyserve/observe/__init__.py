"""Metrics, logs, traces, time series, alerting and notifications (the gateway's view)."""
