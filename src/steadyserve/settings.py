"""The only reader of files, environment and flags. Precedence: defaults < file < env < flags.

steadyserve.toml:

    [gateway]                 # any GatewayConfig field
    port = 8000
    [supervisor]              # any SupervisorConfig field
    restart_cap_s = 30
    [deployments.minilm]      # one table per deployment; any DeploymentConfig field
    service = "steadyserve.examples.embedding:Embedder"
    replicas = 2
    [deployments.minilm.autoscale]   # optional; any AutoscaleConfig field
    min_replicas = 0
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_SERVICE,
    RISK_SERVICE,
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
from .errors import ConfigError

ENV_PREFIX = "STEADYSERVE_"
DEFAULT_DEPLOYMENT = "minilm"
DEFAULT_REPLICAS = 2
RISK_DEPLOYMENT = "risk"  # served beside the embedding model by a bare `steadyserve run`


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _bundles(raw: Any, name: str) -> tuple[tuple[tuple[str, float], ...], ...]:
    """`placement_bundles = [{CPU = 1, GPU = 1}, {GPU = 1}]` as the config holds it."""
    where = f"[deployments.{name}] placement_bundles"
    if not isinstance(raw, list) or not all(isinstance(b, dict) for b in raw):
        raise ConfigError(f"{where} must be a list of tables, e.g. [{{CPU = 1, GPU = 1}}]")
    out = []
    for bundle in raw:
        items = []
        for resource, amount in bundle.items():
            if isinstance(amount, bool) or not isinstance(amount, int | float):
                raise ConfigError(f"{where}: {resource} must be a number, got {amount!r}")
            items.append((str(resource), float(amount)))
        out.append(tuple(sorted(items)))
    return tuple(out)


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    unknown = sorted(set(values) - _fields(cls))
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; known: {sorted(_fields(cls))}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _tuples(table: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """TOML arrays arrive as lists; frozen config holds tuples."""
    out = dict(table)
    for key in keys:
        if key in out:
            if not isinstance(out[key], list):
                raise ConfigError(f"{key} must be a list")
            out[key] = tuple(str(v) for v in out[key])
    return out


def _canary(table: dict[str, Any]) -> dict[str, Any]:
    out = _tuples(table, ("sticky_headers",))
    if "steps" in out:
        steps = out["steps"]
        if not isinstance(steps, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in steps):
            raise ConfigError("steps must be a list of percentages, e.g. [5, 25, 50]")
        out["steps"] = tuple(float(v) for v in steps)
    return out


def _alerting(table: dict[str, Any]) -> dict[str, Any]:
    out = _tuples(table, ("webhook_urls",))
    actions = out.get("actions")
    if actions is not None:
        if not isinstance(actions, dict) or not all(isinstance(v, list) for v in actions.values()):
            raise ConfigError("[alerting] actions must be a table of rule = [action, ...]")
        out["actions"] = tuple((str(k), tuple(str(a) for a in v)) for k, v in actions.items())
    return out


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def deployment_name_for(target: str) -> str:
    cls = target.rpartition(":")[2]
    name = re.sub(r"(?<!^)(?=[A-Z])", "-", cls).lower()
    return re.sub(r"[^a-z0-9_.-]", "-", name) or "service"


def load_config(
    *,
    target: str | None = None,
    config_path: str | None = None,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Build the Config. `flags` holds CLI values (None = not given)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if "replicas" in flags and flags["replicas"] < 1:
        # 0 declares a paused deployment; in a file that is deliberate, on a command line a slip
        raise ConfigError("--replicas must be >= 1 (a paused deployment, replicas = 0, is "
                          "declared in steadyserve.toml)")
    env = env or {}
    cwd = cwd or Path.cwd()
    file: dict[str, Any] = {}
    if config_path is None and target is None and (cwd / "steadyserve.toml").is_file():
        config_path = str(cwd / "steadyserve.toml")
    if config_path is not None:
        file = read_toml(Path(config_path))
    unknown = sorted(set(file) - {"gateway", "supervisor", "resilience", "observability",
                                  "alerting", "cache", "auth", "cluster", "feedback", "backup",
                                  "jobs", "deployments", "data_dir",
                                  "database_url", "log_level", "log_format", "backend",
                                  "ray_address", "gpus"})
    if unknown:
        raise ConfigError(f"{config_path}: unknown section {unknown[0]!r}")
    for section in ("gateway", "supervisor", "resilience", "observability", "alerting",
                    "cache", "auth", "cluster", "feedback", "backup", "jobs", "deployments"):
        if section in file and not isinstance(file[section], dict):
            raise ConfigError(f"{config_path}: [{section}] must be a table")

    gateway = _tuples(dict(file.get("gateway", {})), ("allowed_hosts", "cors_origins"))
    for key, cast in (("host", str), ("port", int)):
        if ENV_PREFIX + key.upper() in env:
            try:
                gateway[key] = cast(env[ENV_PREFIX + key.upper()])
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{key.upper()} must be {cast.__name__}") from None
    for key in ("host", "port", "max_body_bytes", "workers"):
        if key in flags:
            gateway[key] = flags[key]

    top_keys = ("data_dir", "database_url", "log_level", "log_format", "backend", "ray_address")
    top: dict[str, Any] = {k: file[k] for k in top_keys if k in file}
    if "gpus" in file:
        if not isinstance(file["gpus"], list):
            raise ConfigError(f"{config_path}: gpus must be a list, e.g. [\"0\", \"1\"]")
        top["gpus"] = tuple(str(g) for g in file["gpus"])
    for key in top_keys:
        if ENV_PREFIX + key.upper() in env:
            top[key] = env[ENV_PREFIX + key.upper()]
        if key in flags:
            top[key] = flags[key]

    cache = dict(file.get("cache", {}))
    if ENV_PREFIX + "REDIS_URL" in env:
        cache["redis_url"] = env[ENV_PREFIX + "REDIS_URL"] or None
    if "redis_url" in flags:
        cache["redis_url"] = flags["redis_url"]

    auth = dict(file.get("auth", {}))
    if "allow_unauthenticated" in flags:
        auth["allow_unauthenticated"] = flags["allow_unauthenticated"]

    deployments: list[DeploymentConfig] = []
    if target is not None:
        values: dict[str, Any] = {"name": flags.get("name") or deployment_name_for(target),
                                  "service": target, "replicas": flags.get("replicas", 1)}
        if "balancer" in flags:
            values["balancer"] = flags["balancer"]
        deployments.append(_build(DeploymentConfig, values, "command line"))
    elif file.get("deployments"):
        for name, table in file["deployments"].items():
            if not isinstance(table, dict):
                raise ConfigError(f"{config_path}: [deployments.{name}] must be a table")
            values = _tuples({"name": name, **table},
                             ("services", "rollout_env", "calls"))
            if "env" in values:
                if not isinstance(values["env"], dict):
                    raise ConfigError(f"{config_path}: [deployments.{name}] env must be a table")
                values["env"] = tuple((str(k), str(v)) for k, v in values["env"].items())
            if "placement_bundles" in values:
                values["placement_bundles"] = _bundles(values["placement_bundles"], name)
            if "autoscale" in values:
                if not isinstance(values["autoscale"], dict):
                    raise ConfigError(f"{config_path}: [deployments.{name}.autoscale] must be "
                                      "a table")
                where = f"[deployments.{name}.autoscale]"
                try:
                    values["autoscale"] = _build(AutoscaleConfig, values["autoscale"], where)
                except ConfigError as exc:  # say which deployment's table is wrong
                    message = exc.message.removeprefix("autoscale: ")
                    raise ConfigError(message if message.startswith(where)
                                      else f"{where}: {message}") from None
            if "canary" in values:
                if not isinstance(values["canary"], dict):
                    raise ConfigError(f"{config_path}: [deployments.{name}.canary] must be a "
                                      "table")
                where = f"[deployments.{name}.canary]"
                try:
                    values["canary"] = _build(CanaryConfig, _canary(values["canary"]), where)
                except ConfigError as exc:
                    message = exc.message.removeprefix("canary: ")
                    raise ConfigError(message if message.startswith(where)
                                      else f"{where}: {message}") from None
            deployments.append(_build(DeploymentConfig, values, f"[deployments.{name}]"))
    else:
        deployments.append(DeploymentConfig(
            name=flags.get("name") or DEFAULT_DEPLOYMENT, service=DEFAULT_SERVICE,
            replicas=flags.get("replicas", DEFAULT_REPLICAS),
            balancer=flags.get("balancer", "power_of_two"),
        ))
        if "name" not in flags:
            # its `assess` pipeline calls the embedder and its own `score`
            deployments.append(DeploymentConfig(
                name=RISK_DEPLOYMENT, service=RISK_SERVICE, replicas=1,
                calls=(DEFAULT_DEPLOYMENT, RISK_DEPLOYMENT)))

    return Config(
        deployments=tuple(deployments),
        gateway=_build(GatewayConfig, gateway, "[gateway]"),
        supervisor=_build(SupervisorConfig, file.get("supervisor", {}), "[supervisor]"),
        resilience=_build(ResilienceConfig, file.get("resilience", {}), "[resilience]"),
        observability=_build(ObservabilityConfig, file.get("observability", {}),
                             "[observability]"),
        alerting=_build(AlertingConfig, _alerting(file.get("alerting", {})), "[alerting]"),
        cache=_build(CacheConfig, cache, "[cache]"),
        auth=_build(AuthConfig, auth, "[auth]"),
        cluster=_build(ClusterConfig, file.get("cluster", {}), "[cluster]"),
        feedback=_build(FeedbackConfig, file.get("feedback", {}), "[feedback]"),
        backup=_build(BackupConfig, file.get("backup", {}), "[backup]"),
        jobs=_build(JobsConfig, _tuples(file.get("jobs", {}), ("webhook_hosts",)), "[jobs]"),
        **top,
    )
