"""config.py: validation in the frozen config dataclasses."""

from __future__ import annotations

import dataclasses

import pytest

from steadyserve.config import (
    MAX_COALESCED_CALLS,
    CanaryConfig,
    Config,
    DeploymentConfig,
    GatewayConfig,
    SupervisorConfig,
)
from steadyserve.errors import ConfigError


def dep(**kw) -> DeploymentConfig:
    values = {"name": "emb", "service": "app.py:Embedder", **kw}
    return DeploymentConfig(**values)


@pytest.mark.parametrize(
    "name",
    ["a", "emb", "all-minilm-l6-v2", "v1.2", "x_y", "0abc", "a" * 63],
    ids=["one-char", "plain", "dashes", "dots", "underscore", "leading-digit", "63-chars"],
)
def test_valid_deployment_names(name):
    assert dep(name=name).name == name


@pytest.mark.parametrize(
    "name",
    ["", "Emb", "my model", "-emb", ".emb", "_emb", "emb/x", "a" * 64, "émb", "emb:1"],
    ids=["empty", "uppercase", "space", "leading-dash", "leading-dot", "leading-underscore", "slash",
         "64-chars", "non-ascii", "colon"],
)
def test_invalid_deployment_names(name):
    with pytest.raises(ConfigError, match="deployment name"):
        dep(name=name)


def test_deployment_name_with_trailing_newline_is_invalid():
    with pytest.raises(ConfigError, match="deployment name"):
        dep(name="emb\n")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(service="app.py"), "service must be", id="service-without-class"),
        pytest.param(dict(replicas=-1), "replicas must be >= 0", id="replicas-negative"),
        pytest.param(dict(replicas=5, max_replicas=4), "over max_replicas", id="over-max"),
        pytest.param(dict(max_replicas=0), "max_replicas must be in", id="max-replicas-0"),
        pytest.param(dict(services=("nocolon",)), "services entries", id="services-no-class"),
        pytest.param(dict(rollout_env=("BAD KEY",)), "rollout_env entries", id="env-key"),
        pytest.param(dict(balancer="random"), "unknown balancer 'random'", id="unknown-balancer"),
        pytest.param(dict(torch_threads=0), "torch_threads must be >= 1", id="torch-threads-0"),
        pytest.param(dict(max_connections_per_replica=0), "max_connections_per_replica",
                     id="max-connections-0"),
        pytest.param(dict(calls=("a", "a")), "each once", id="calls-twice"),
        pytest.param(dict(calls=tuple(f"d{i}" for i in range(65))), "at most 64",
                     id="calls-too-many"),
    ],
)
def test_invalid_deployment(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dep(**kwargs)


def test_zero_replicas_is_a_valid_paused_deployment():
    assert dep(replicas=0).replicas == 0


def test_unknown_balancer_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        dep(balancer="random")
    for known in ("peak_ewma", "power_of_two", "round_robin"):
        assert known in str(info.value)


@pytest.mark.parametrize("balancer", ["power_of_two", "round_robin", "peak_ewma", "least_squares"])
def test_known_balancers_accepted(balancer):
    assert dep(balancer=balancer).balancer == balancer


def test_deployment_defaults():
    d = dep()
    assert (d.replicas, d.balancer, d.torch_threads, d.max_connections_per_replica, d.env) == (
        1, "power_of_two", None, 256, ())


@pytest.mark.parametrize("port", [0, 1, 8000, 65535], ids=str)
def test_valid_ports(port):
    assert GatewayConfig(port=port).port == port


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(port=-1), "port must be 0..65535", id="port-negative"),
        pytest.param(dict(port=65536), "port must be 0..65535", id="port-65536"),
        pytest.param(dict(max_body_bytes=1023), "max_body_bytes", id="body-limit-too-small"),
        pytest.param(dict(compress_min_bytes=-1), "compress_min_bytes", id="compress-min-negative"),
        pytest.param(dict(request_timeout_s=0), "request_timeout_s", id="request-timeout-0"),
        pytest.param(dict(graceful_shutdown_s=-1), "graceful_shutdown_s", id="graceful-negative"),
        pytest.param(dict(coalesce_max_items=MAX_COALESCED_CALLS + 1),
                     f"coalesce_max_items must be 0..{MAX_COALESCED_CALLS} ", id="coalesce-over"),
    ],
)
def test_invalid_gateway(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GatewayConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(restart_base_s=0), "restart_base_s", id="base-0"),
        pytest.param(dict(restart_base_s=5, restart_cap_s=1), "restart_base_s <= restart_cap_s",
                     id="cap-below-base"),
        pytest.param(dict(ready_timeout_s=0), "must be > 0", id="ready-timeout-0"),
        pytest.param(dict(health_interval_s=-1), "must be > 0", id="health-interval-negative"),
        pytest.param(dict(health_timeout_s=0), "must be > 0", id="health-timeout-0"),
        pytest.param(dict(drain_timeout_s=0), "must be > 0", id="drain-timeout-0"),
        pytest.param(dict(reconcile_interval_s=0), "must be > 0", id="reconcile-0"),
        pytest.param(dict(unhealthy_after=0), "unhealthy_after", id="unhealthy-after-0"),
    ],
)
def test_invalid_supervisor(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SupervisorConfig(**kwargs)


def test_supervisor_base_equal_cap_allowed():
    assert SupervisorConfig(restart_base_s=2, restart_cap_s=2).restart_cap_s == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(deployments=()), "at least one deployment", id="no-deployments"),
        pytest.param(dict(deployments=(dep(name="a"), dep(name="b"), dep(name="a"))),
                     r"duplicate deployment names: \['a'\]", id="duplicate-names"),
        pytest.param(dict(deployments=(dep(),), log_format="xml"), "log_format", id="bad-log-format"),
        pytest.param(dict(deployments=(dep(),), log_level="trace"), "log_level", id="bad-log-level"),
        pytest.param(dict(deployments=(dep(name="a", calls=("a", "b")),)),
                     r"calls names \['b'\], which are not configured", id="calls-unknown"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Config(**kwargs)


@pytest.mark.parametrize("fmt", ["json", "text", "auto"])
def test_log_formats_accepted(fmt):
    assert Config(deployments=(dep(),), log_format=fmt).log_format == fmt


def test_log_level_case_insensitive():
    assert Config(deployments=(dep(),), log_level="WARNING").log_level == "WARNING"


def test_a_deployment_calls_those_it_lists_itself_included():
    config = Config(deployments=(dep(name="a", calls=("b", "a")), dep(name="b")))
    assert config.deployment("a").calls == ("b", "a") and config.deployment("b").calls == ()


@pytest.mark.parametrize(("deployments", "loop"), [
    ((dep(name="a", shadow="b"), dep(name="b", calls=("a",))), "a → b → a"),
    ((dep(name="a", shadow="b"), dep(name="b", calls=("c",)), dep(name="c", calls=("a",))),
     "a → b → c → a"),
    ((dep(name="a", shadow="b"), dep(name="b", calls=("c",)), dep(name="c", shadow="d"),
      dep(name="d", calls=("a",))), "a → b → c → d → a"),
    # a call to c may go to its canary's candidate, which calls a
    ((dep(name="a", shadow="s"), dep(name="s", calls=("b",)),
      dep(name="b", canary=CanaryConfig(deployment="c")), dep(name="c", calls=("a",))),
     "a → s → b → c → a"),
])
def test_a_shadow_that_leads_back_to_its_deployment_is_refused(deployments, loop):
    with pytest.raises(ConfigError, match=f"its shadow leads back to it \\({loop}\\)"):
        Config(deployments=deployments)


@pytest.mark.parametrize("deployments", [
    (dep(name="a", shadow="b", calls=("c",)), dep(name="b", calls=("c", "b")), dep(name="c")),
    # a shadow copy is not mirrored again: two deployments shadowing each other cannot loop
    (dep(name="a", shadow="s"), dep(name="s", shadow="a")),
    # a copy reaching c (shadowed to a) straight is not mirrored: only calls through routes
    (dep(name="a", shadow="c"), dep(name="c", shadow="a")),
])
def test_a_shadow_that_cannot_lead_back_is_fine(deployments):
    assert Config(deployments=deployments).deployment("a").shadow is not None


def test_config_lookup_and_total_replicas():
    config = Config(deployments=(dep(name="a", replicas=2), dep(name="b", replicas=3)))
    assert config.deployment("b").replicas == 3
    assert config.total_replicas == 5
    with pytest.raises(KeyError):
        config.deployment("c")


def test_configs_are_frozen():
    d = dep()
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.replicas = 5  # type: ignore[misc]
