"""Docs stay in step with the code: every config field is in docs/configuration.md, and the
README opens with the two commands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from steadyserve.config import (
    AlertingConfig,
    AuthConfig,
    AutoscaleConfig,
    BackupConfig,
    CacheConfig,
    CanaryConfig,
    ClusterConfig,
    Config,
    DeploymentConfig,
    FeedbackConfig,
    GatewayConfig,
    JobsConfig,
    ObservabilityConfig,
    ResilienceConfig,
    SupervisorConfig,
)
from steadyserve.service import HandlerOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cls", [Config, AuthConfig, GatewayConfig, SupervisorConfig, ResilienceConfig,
                                 ObservabilityConfig, AlertingConfig, CacheConfig, DeploymentConfig,
                                 AutoscaleConfig, ClusterConfig, HandlerOptions, FeedbackConfig,
                                 BackupConfig, CanaryConfig, JobsConfig])
def test_every_config_field_is_documented(cls):
    doc = (ROOT / "docs" / "configuration.md").read_text()
    skip = {"deployments", "gateway", "supervisor", "resilience", "observability", "alerting",
            "cache", "auth", "cluster", "feedback", "backup", "jobs", "name"}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in skip
               and f"`{f.name}`" not in doc]
    assert missing == []


def test_readme_opens_with_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:20])
    assert "make run" in head and "make test" in head
