"""A replica's environment: its deployment's own child-call token, never one inherited from
the gateway's environment or another deployment's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from steadyserve.auth.keyring import KeyRing
from steadyserve.config import Config, DeploymentConfig
from steadyserve.control import launcher


@pytest.fixture
def tokens() -> Iterator[KeyRing]:
    ring = KeyRing()
    launcher.set_child_tokens(ring.child_token)
    yield ring
    launcher.set_child_tokens(launcher._no_child_token)


def test_each_replica_gets_its_own_deployments_token(tokens: KeyRing) -> None:
    a = DeploymentConfig(name="a", service="x.py:A", calls=("b",))
    b = DeploymentConfig(name="b", service="x.py:B", env=(("STEADYSERVE_CHILD_TOKEN", "mine"),))
    config = Config(deployments=(a, b))
    base = {"PATH": "/bin", "STEADYSERVE_CHILD_TOKEN": "inherited"}
    env_a = launcher.replica_env(config, a, "a-0", base)
    env_b = launcher.replica_env(config, b, "b-0", base)
    assert env_a["STEADYSERVE_CHILD_TOKEN"] == tokens.child_token("a")
    # not even the deployment's own env may set another: the credential is the gateway's
    assert env_b["STEADYSERVE_CHILD_TOKEN"] == tokens.child_token("b") != env_a[
        "STEADYSERVE_CHILD_TOKEN"]
    assert env_a["PATH"] == "/bin"


def test_no_token_before_the_gateway_knows_its_admin_key() -> None:
    a = DeploymentConfig(name="a", service="x.py:A")
    env = launcher.replica_env(Config(deployments=(a,)), a, "a-0",
                               {"STEADYSERVE_CHILD_TOKEN": "inherited"})
    assert "STEADYSERVE_CHILD_TOKEN" not in env
