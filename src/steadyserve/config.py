"""The whole configuration as frozen dataclasses, declared once and validated when built.

No I/O here: `settings.py` is the only reader of files, environment and flags.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import ConfigError
from .observe.logs import FileSink
from .policies.balancing import BALANCERS

MAX_CALLEES = 64  # deployments one deployment may call (`calls`)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_RESOURCE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_GPU = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # "0", "GPU-8f0c…", "MIG-…"
DEFAULT_SERVICE = "steadyserve.examples.embedding:Embedder"
RISK_SERVICE = "steadyserve.examples.risk.service:RiskScorer"
MiB = 1024 * 1024
# calls in one coalesced exchange (POST /invoke-many/<handler>, gateway.coalesce): a replica
# refuses more (replica.server), so [gateway] coalesce_max_items is at most this
MAX_COALESCED_CALLS = 1024
_HEADER = re.compile(r"[a-z0-9-]{1,64}")
_ANSWER_PATH = re.compile(r"[A-Za-z0-9_]{1,64}(\.[A-Za-z0-9_]{1,64}){0,7}")


@dataclass(frozen=True, kw_only=True, slots=True)
class AutoscaleConfig:
    """`[deployments.<name>.autoscale]`: the replica count follows demand (policies.autoscale).

    Demand is the deployment's ongoing requests at the gateway: in flight, waiting for an
    admission slot, and held while it scales from zero."""

    min_replicas: int = 1  # 0: scale to zero when idle (requests then wait for a replica)
    max_replicas: int | None = None  # None: the deployment's max_replicas (cores and memory)
    target_ongoing_requests: float = 2.0  # per replica, queued included
    upscale_delay_s: float = 3.0  # demand must call for more replicas this long first…
    downscale_delay_s: float = 60.0  # …and for fewer this long (a drop must last)
    scale_to_zero_delay_s: float = 300.0  # no demand this long (after the stable window) → 0
    stable_window_s: float = 30.0  # demand is averaged over this window (smoothing)
    panic_window_s: float = 3.0  # …and over this one for bursts
    panic_threshold: float = 2.0  # short-window demand ≥ this × ready capacity: scale up now
    tolerance: float = 0.1  # demand within ±10 % of the current capacity changes nothing
    interval_s: float = 0.5  # sample demand and decide this often
    hold_max_requests: int = 256  # requests held while no replica is ready (then 503)
    activation_timeout_s: float = 60.0  # a held request waits at most this long (then 503)
    scale_up_hold_s: float = 600.0  # the scale_up automatic response holds its floor this long

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ConfigError("autoscale: min_replicas must be >= 0")
        if self.max_replicas is not None and not \
                max(1, self.min_replicas) <= self.max_replicas <= 10_000:
            raise ConfigError("autoscale: max_replicas must be >= max(1, min_replicas) and "
                              "<= 10000")
        if not self.target_ongoing_requests > 0:
            raise ConfigError("autoscale: target_ongoing_requests must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s", "scale_to_zero_delay_s"):
            if not 0 <= getattr(self, name) <= 86_400:
                raise ConfigError(f"autoscale: {name} must be in [0, 86400]")
        if not 0 < self.panic_window_s <= self.stable_window_s <= 3600:
            raise ConfigError("autoscale: need 0 < panic_window_s <= stable_window_s <= 3600")
        if not self.panic_threshold > 1:
            raise ConfigError("autoscale: panic_threshold must be > 1")
        if not 0 <= self.tolerance < 1:
            raise ConfigError("autoscale: tolerance must be in [0, 1)")
        if not 0.05 <= self.interval_s <= 60:
            raise ConfigError("autoscale: interval_s must be in [0.05, 60]")
        if not 0 <= self.hold_max_requests <= 100_000:
            raise ConfigError("autoscale: hold_max_requests must be in [0, 100000]")
        if not 0 < self.activation_timeout_s <= 3600:
            raise ConfigError("autoscale: activation_timeout_s must be in (0, 3600]")
        if not 0 <= self.scale_up_hold_s <= 86_400:
            raise ConfigError("autoscale: scale_up_hold_s must be in [0, 86400]")


@dataclass(frozen=True, kw_only=True, slots=True)
class CanaryConfig:
    """`[deployments.<name>.canary]`: a progressive rollout to a candidate deployment
    (gateway.canary, policies.canary). Started by `POST /v1/admin/deployments/<name>/canary`
    (or `steadyserve canary start <name>`), never by the configuration alone."""

    deployment: str  # the candidate: another deployment of this configuration
    steps: tuple[float, ...] = (5.0, 25.0, 50.0)  # % to the candidate; passing the last → 100
    min_samples: int = 200  # requests per arm at a step before any look
    min_step_s: float = 30.0  # a step lasts at least this long, even when every check passes
    interval_s: float = 1.0  # the evidence is looked at this often
    alpha: float = 0.05  # false-alarm budget of a step over all its looks
    latency_margin: float = 0.2  # the candidate may be up to 20 % slower
    error_margin: float = 0.005  # … and have up to 0.5 points more errors
    quality_margin: float = 0.02  # … and up to 2 points lower label accuracy
    quality_min_labels: int = 30  # labels per arm before quality is tested
    require_quality: bool = False  # true: a step waits for quality to pass (needs labels)
    rollback_on_alert: bool = True  # an alert firing on the candidate rolls it back at once
    sticky_headers: tuple[str, ...] = ("x-session-id", "x-user-id")  # first present wins
    max_latencies: int = 20_000  # latencies kept per arm per step (a bound on memory)

    def __post_init__(self) -> None:
        if not self.steps or len(self.steps) > 20 or any(
                not 0 < s <= 100 for s in self.steps) or list(self.steps) != sorted(
                set(self.steps)):
            raise ConfigError("canary: steps must be 1 to 20 rising percentages in (0, 100]")
        if not 1 <= self.min_samples <= 10_000_000:
            raise ConfigError("canary: min_samples must be in [1, 10000000]")
        if not 0 <= self.min_step_s <= 86_400 or not 0.05 <= self.interval_s <= 3600:
            raise ConfigError("canary: min_step_s must be in [0, 86400] and interval_s in "
                              "[0.05, 3600]")
        if not 0 < self.alpha < 0.5:
            raise ConfigError("canary: alpha must be in (0, 0.5)")
        if not 0 <= self.latency_margin <= 10 or not 0 <= self.error_margin < 1 \
                or not 0 <= self.quality_margin < 1:
            raise ConfigError("canary: latency_margin must be in [0, 10], error_margin and "
                              "quality_margin in [0, 1)")
        if not 0 <= self.quality_min_labels <= 1_000_000:
            raise ConfigError("canary: quality_min_labels must be in [0, 1000000]")
        if len(self.sticky_headers) > 8 or any(
                not _HEADER.fullmatch(h) for h in self.sticky_headers):
            raise ConfigError("canary: sticky_headers must be at most 8 header names")
        if not 100 <= self.max_latencies <= 1_000_000:
            raise ConfigError("canary: max_latencies must be in [100, 1000000]")


@dataclass(frozen=True, kw_only=True, slots=True)
class DeploymentConfig:
    name: str
    service: str  # "path/to/file.py:Class" or "package.module:Class"
    replicas: int = 1
    max_replicas: int | None = None  # None: from cores and memory (control.launcher)
    balancer: str = "power_of_two"
    torch_threads: int | None = None  # None: cores // all replicas, at least 1
    max_connections_per_replica: int = 256
    env: tuple[tuple[str, str], ...] = ()
    # what a rollout over the network may choose: nothing it sends becomes code or environment
    services: tuple[str, ...] = ()  # other service targets a rollout may switch to
    rollout_env: tuple[str, ...] = ()  # environment keys a rollout may set
    # the deployments its handlers may call (`self.deployment(name)`; auth.childcalls):
    # its replicas' child calls to any other are refused (403)
    calls: tuple[str, ...] = ()
    # None: a fixed count (`replicas`); set: `replicas` is the count it starts with, clamped
    autoscale: AutoscaleConfig | None = None
    # what one replica asks the Ray cluster for (backend = "ray"; unused by local replicas)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_bytes: int | None = None
    # a replica that needs several bundles of resources (shards of a model on several GPUs):
    # Ray reserves them together as a placement group; the replica runs in the first
    placement_bundles: tuple[tuple[tuple[str, float], ...], ...] = ()
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    # feedback labels (a `correction`) are compared with the probability at this path of
    # the answer, e.g. "0.score" (the first result's `score`); None: no label metrics
    feedback_prediction: str | None = None
    feedback_positive: str = "positive"  # the correction that means the positive class
    # shadow traffic: this share of requests also goes to another deployment (a candidate),
    # its answer compared with the client's and discarded (gateway.shadow)
    shadow: str | None = None
    shadow_share: float = 0.1
    shadow_max_inflight: int = 8
    shadow_timeout_s: float = 10.0
    shadow_tolerance: float = 1e-6  # numbers this close count as the same answer
    # a progressive rollout to a candidate deployment, with statistical verdicts
    canary: CanaryConfig | None = None

    def _check_placement(self) -> None:
        where = f"deployment {self.name}: placement_bundles"
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"deployment {self.name}: placement_strategy must be one of "
                              f"{list(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}")
        if len(self.placement_bundles) > 64:
            raise ConfigError(f"{where}: at most 64 bundles")
        for bundle in self.placement_bundles:
            if not bundle or len(bundle) > 16:
                raise ConfigError(f"{where}: each bundle names 1 to 16 resources")
            for resource, amount in bundle:
                if not _RESOURCE.fullmatch(resource) or not 0 < amount <= 1e12:
                    raise ConfigError(f"{where}: {resource!r} = {amount!r}: a resource name "
                                      "(letters, digits, _ - . : /) and an amount > 0")
        if self.placement_bundles:
            first = dict(self.placement_bundles[0])
            if first.get("CPU", 0.0) < self.num_cpus or first.get("GPU", 0.0) < self.num_gpus:
                raise ConfigError(f"{where}: the replica runs in the first bundle, which must "
                                  f"hold its num_cpus ({self.num_cpus:g}) and num_gpus "
                                  f"({self.num_gpus:g}) as CPU and GPU")

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"deployment name {self.name!r}: use lowercase letters, digits, '-', '_', '.'"
            )
        if self.feedback_prediction is not None and not _ANSWER_PATH.fullmatch(
                self.feedback_prediction):
            raise ConfigError(f"deployment {self.name}: feedback_prediction is a path into the "
                              "answer of keys and list indices, e.g. \"0.score\"")
        if not 0 < len(self.feedback_positive) <= 128:
            raise ConfigError(f"deployment {self.name}: feedback_positive: 1 to 128 characters")
        if self.shadow == self.name or not 0 <= self.shadow_share <= 1 \
                or self.shadow_max_inflight < 1 or self.shadow_timeout_s <= 0 \
                or self.shadow_tolerance < 0:
            raise ConfigError(f"deployment {self.name}: shadow must name another deployment, "
                              "with shadow_share in [0, 1], shadow_max_inflight >= 1, "
                              "shadow_timeout_s > 0 and shadow_tolerance >= 0")
        if ":" not in self.service:
            raise ConfigError(f"deployment {self.name}: service must be 'file.py:Class' "
                              f"or 'module:Class', got {self.service!r}")
        if self.replicas < 0:
            raise ConfigError(f"deployment {self.name}: replicas must be >= 0")
        if self.max_replicas is not None and not 1 <= self.max_replicas <= 10_000:
            raise ConfigError(f"deployment {self.name}: max_replicas must be in [1, 10000]")
        if self.max_replicas is not None and self.replicas > self.max_replicas:
            raise ConfigError(f"deployment {self.name}: replicas ({self.replicas}) is over "
                              f"max_replicas ({self.max_replicas})")
        for target in self.services:
            if ":" not in target:
                raise ConfigError(f"deployment {self.name}: services entries must be "
                                  f"'file.py:Class' or 'module:Class', got {target!r}")
        if len(self.calls) > MAX_CALLEES or len(set(self.calls)) != len(self.calls):
            raise ConfigError(f"deployment {self.name}: calls lists at most {MAX_CALLEES} "
                              "deployments, each once")
        for key in self.rollout_env:
            if not _ENV_KEY.fullmatch(key):
                raise ConfigError(f"deployment {self.name}: rollout_env entries must be "
                                  f"environment variable names, got {key!r}")
        if self.balancer not in BALANCERS:
            raise ConfigError(f"deployment {self.name}: unknown balancer {self.balancer!r}; "
                              f"choose one of {sorted(BALANCERS)}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"deployment {self.name}: torch_threads must be >= 1")
        if self.max_connections_per_replica < 1:
            raise ConfigError(f"deployment {self.name}: max_connections_per_replica must be >= 1")
        if not 0 <= self.num_cpus <= 1024 or not 0 <= self.num_gpus <= 64:
            raise ConfigError(f"deployment {self.name}: num_cpus must be in [0, 1024] and "
                              "num_gpus in [0, 64]")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise ConfigError(f"deployment {self.name}: memory_bytes must be >= 1")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ConfigError(f"deployment {self.name}: num_gpus above 1 must be a whole "
                              f"number of GPUs, got {self.num_gpus:g}")
        self._check_placement()
        scale = self.autoscale
        if scale is not None and self.max_replicas is not None and \
                scale.min_replicas > self.max_replicas:
            raise ConfigError(f"deployment {self.name}: autoscale min_replicas "
                              f"({scale.min_replicas}) is over max_replicas ({self.max_replicas})")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
BACKENDS = ("local", "ray")


def is_loopback(host: str) -> bool:
    """A listen address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


@dataclass(frozen=True, kw_only=True, slots=True)
class GatewayConfig:
    """The HTTP edge: every input a client controls has a bound here (docs/configuration.md)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1 * MiB  # after decoding a gzip/deflate/zstd Content-Encoding
    compress_min_bytes: int = 1024  # responses smaller than this are never compressed
    request_timeout_s: float = 60.0  # upper bound on any one client request (and on its header)
    graceful_shutdown_s: float = 10.0  # drain in-flight requests on SIGTERM for at most this
    # who may talk to it: Host allow-list (DNS rebinding) and cross-origin browsers
    allowed_hosts: tuple[str, ...] = ()  # (): loopback names and the listen address; "*": any
    cors_origins: tuple[str, ...] = ()  # browser origins allowed cross-site; none by default
    # the connection edge (431, 414, 408, 503)
    max_request_line_bytes: int = 8 * 1024
    max_header_bytes: int = 32 * 1024  # the whole header section
    max_headers: int = 100
    header_timeout_s: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout_s: float = 30.0  # from the end of the headers to the end of the body
    keepalive_timeout_s: float = 15.0  # an idle keep-alive connection is closed after this
    max_connections: int = 2048  # open client connections; the oldest idle is closed first
    lingering_close_s: float = 2.0  # after an early answer (413), read and drop the rest this long…
    lingering_close_bytes: int = 8 * MiB  # …or this much, so the client reads the answer
    send_timeout_s: float = 30.0  # a client that reads nothing of a response this long is cut off
    max_upstream_response_bytes: int = 256 * MiB  # a replica's answer larger than this is refused
    # data-plane processes sharing the port (SO_REUSEPORT): 1 is the gateway process alone;
    # N > 1 adds N - 1 workers that serve inference, fed membership by the gateway process
    workers: int = 1
    # a replica's calls to other deployments (gateway.compose): chains deeper than this are
    # refused with 508 loop_detected (a deployment calling itself, A → B → A)
    max_call_depth: int = 8
    # child calls one request's handler may make (per gateway process; auth.childcalls): more
    # are refused with 429 too_many_child_calls (a handler calling in a loop)
    max_child_calls_per_request: int = 256
    # calls to one batched handler on one replica started in the same loop turn travel as
    # one exchange (gateway.coalesce): at most this many calls and body bytes; < 2: never
    coalesce_max_items: int = 64
    coalesce_max_bytes: int = 4 * MiB

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if not 1 <= self.max_call_depth <= 64:
            raise ConfigError(f"max_call_depth must be 1..64, got {self.max_call_depth}")
        if not 1 <= self.max_child_calls_per_request <= 100_000:
            raise ConfigError("max_child_calls_per_request must be 1..100000, got "
                              f"{self.max_child_calls_per_request}")
        if not 0 <= self.coalesce_max_items <= MAX_COALESCED_CALLS or self.coalesce_max_bytes < 1024:
            raise ConfigError(f"coalesce_max_items must be 0..{MAX_COALESCED_CALLS} (a replica "
                              f"takes at most {MAX_COALESCED_CALLS} calls in one exchange) and "
                              "coalesce_max_bytes >= 1024")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be 1..64, got {self.workers}")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be >= 1024")
        if self.compress_min_bytes < 0:
            raise ConfigError("compress_min_bytes must be >= 0")
        if self.request_timeout_s <= 0 or self.graceful_shutdown_s < 0:
            raise ConfigError("request_timeout_s must be > 0 and graceful_shutdown_s >= 0")
        if min(self.header_timeout_s, self.body_timeout_s, self.keepalive_timeout_s,
               self.send_timeout_s) <= 0 or self.lingering_close_s < 0:
            raise ConfigError("header_timeout_s, body_timeout_s, keepalive_timeout_s, "
                              "send_timeout_s must be > 0 and lingering_close_s >= 0")
        if self.max_request_line_bytes < 256 or self.max_header_bytes < 1024 \
                or self.max_headers < 8:
            raise ConfigError("need max_request_line_bytes >= 256, max_header_bytes >= 1024, "
                              "max_headers >= 8")
        if self.max_connections < 1 or self.lingering_close_bytes < 0:
            raise ConfigError("max_connections must be >= 1 and lingering_close_bytes >= 0")
        if self.max_upstream_response_bytes < 1024:
            raise ConfigError("max_upstream_response_bytes must be >= 1024")
        for host in self.allowed_hosts:
            if not host or any(c in host for c in "/ \t"):
                raise ConfigError(f"allowed_hosts entries are host names or addresses "
                                  f"(no port, no scheme), got {host!r}")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ConfigError(f"cors_origins entries look like https://host[:port], got {origin!r}")

    def host_allowed(self, host: str) -> bool:
        """Is `host` (the Host header without its port, lowercased) one this gateway serves?"""
        if "*" in self.allowed_hosts:
            return True
        if self.allowed_hosts:
            return host in self.allowed_hosts
        return is_loopback(host) or (host == self.host and self.host not in ("0.0.0.0", "::"))


AUTH_MODES = ("auto", "required")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterConfig:
    """Several gateways sharing one database: the singleton duties (alert evaluation and
    notification, autoscaling decisions, rollouts) run on one leader, chosen by a lease in
    the database with a fencing token (control.leadership). Off: this gateway does them all."""

    enabled: bool = False
    gateway_id: str = ""  # "": <hostname>:<port>; unique per gateway (a restart keeps it)
    advertise_url: str = ""  # where operators reach this gateway (named when it leads)
    lease_ttl_s: float = 10.0  # a dead leader's duties move to another gateway within this
    renew_interval_s: float = 2.0  # the leader renews (and followers try to take) this often
    follow_interval_s: float = 1.0  # followers read the stored targets and counts this often

    def __post_init__(self) -> None:
        if self.lease_ttl_s <= 0 or self.renew_interval_s <= 0 or self.follow_interval_s <= 0:
            raise ConfigError("[cluster] lease_ttl_s, renew_interval_s and follow_interval_s "
                              "must be > 0")
        if self.lease_ttl_s < 3 * self.renew_interval_s:
            raise ConfigError("[cluster] lease_ttl_s must be at least 3 x renew_interval_s "
                              "(a leader gets two tries to renew before its lease runs out)")
        if len(self.gateway_id) > 200 or len(self.advertise_url) > 2000:
            raise ConfigError("[cluster] gateway_id is at most 200 characters, advertise_url "
                              "at most 2000")
        if self.advertise_url and not self.advertise_url.startswith(("http://", "https://")):
            raise ConfigError(f"[cluster] advertise_url must be http(s)://, got "
                              f"{self.advertise_url!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class AuthConfig:
    """API keys (docs/configuration.md, README "Access control")."""

    # auto: inference and read-only routes are open while the gateway listens on loopback
    # and no key but the local admin key exists; required: always a key
    inference: str = "auto"
    allow_unauthenticated: bool = False  # serve open inference on a non-loopback address
    admin_key_file: str = "admin.key"  # under data_dir, mode 0600: the local CLI's credential
    key_refresh_s: float = 0.5  # gateways re-read changed keys this often (revocation delay)
    max_keys: int = 10_000
    # per-key usage (auth.usage): stored every usage_flush_s, one row per key, deployment and
    # day, kept usage_retention_days; at most usage_max_entries (key, deployment) pairs are
    # counted in memory between flushes (the rest under the key "-")
    usage_flush_s: float = 10.0
    usage_retention_days: int = 90
    usage_max_entries: int = 10_000

    def __post_init__(self) -> None:
        if self.usage_flush_s <= 0 or self.usage_retention_days < 1 \
                or self.usage_max_entries < 1:
            raise ConfigError("[auth] need usage_flush_s > 0, usage_retention_days >= 1 and "
                              "usage_max_entries >= 1")
        if self.inference not in AUTH_MODES:
            raise ConfigError(f"[auth] inference must be one of {AUTH_MODES}, got {self.inference!r}")
        if not 0 < self.key_refresh_s <= 1.0:
            raise ConfigError("[auth] key_refresh_s must be in (0, 1]: revocation must take "
                              "effect within a second")
        if self.max_keys < 1:
            raise ConfigError("[auth] max_keys must be >= 1")
        if not self.admin_key_file or "\0" in self.admin_key_file:
            raise ConfigError("[auth] admin_key_file must be a file name")


@dataclass(frozen=True, kw_only=True, slots=True)
class SupervisorConfig:
    restart_base_s: float = 0.5  # first restart waits 0.25–0.5 s, doubling up to the cap
    restart_cap_s: float = 30.0
    ready_timeout_s: float = 180.0  # a replica not ready by then is killed and restarted
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    unhealthy_after: int = 3  # consecutive failed /readyz before leaving rotation
    deep_health_interval_s: float = 5.0  # canary inference through the batcher this often
    deep_health_timeout_s: float = 10.0
    restart_unhealthy_after_s: float = 15.0  # unhealthy this long (wedged) → killed, restarted
    drain_timeout_s: float = 10.0  # SIGTERM'd replicas get this long before SIGKILL
    reconcile_interval_s: float = 0.2
    ray_call_timeout_s: float = 30.0  # backend = "ray": placing a replica, any other Ray call
    rollout_max_restarts: int = 2  # a new replica restarting this often fails its rollout
    replica_nice: int = 5  # replicas run this much nicer than the gateway (0..19)

    def __post_init__(self) -> None:
        if self.restart_base_s <= 0 or self.restart_cap_s < self.restart_base_s:
            raise ConfigError("need 0 < restart_base_s <= restart_cap_s")
        if min(self.ready_timeout_s, self.health_interval_s, self.health_timeout_s,
               self.drain_timeout_s, self.reconcile_interval_s, self.deep_health_interval_s,
               self.deep_health_timeout_s, self.restart_unhealthy_after_s) <= 0:
            raise ConfigError("supervisor intervals and timeouts must be > 0")
        if self.unhealthy_after < 1:
            raise ConfigError("unhealthy_after must be >= 1")
        if self.rollout_max_restarts < 1:
            raise ConfigError("rollout_max_restarts must be >= 1")
        if not 0 <= self.replica_nice <= 19:
            raise ConfigError("replica_nice must be in 0..19")


@dataclass(frozen=True, kw_only=True, slots=True)
class ResilienceConfig:
    """Retries, hedging, outlier ejection, admission control, quarantine (docs/configuration.md)."""

    max_attempts: int = 3  # per request, hedges included; retries only for idempotent handlers
    retry_budget_ratio: float = 0.2  # retries ≤ this share of requests over the window…
    retry_budget_window_s: float = 10.0
    retry_budget_min_per_s: float = 3.0  # …plus this floor
    retry_backoff_base_s: float = 0.005
    retry_backoff_cap_s: float = 0.05
    per_try_timeout_min_s: float = 1.0  # per-try timeout = max(this, multiple × observed p99)
    per_try_timeout_p99_multiple: float = 3.0
    hedge_min_delay_s: float = 0.005  # hedges fire after max(this, observed p95)
    outlier_consecutive_failures: int = 5
    outlier_base_ejection_s: float = 30.0
    outlier_max_ejection_s: float = 300.0
    outlier_max_ejection_share: float = 0.5
    outlier_error_ratio: float = 0.8  # handler errors: a replica failing this share of requests…
    outlier_error_min_requests: int = 20  # …over at least this many, while its peers do not
    slow_start_s: float = 10.0
    admission: bool = True  # adaptive concurrency limit + priority wait queue per deployment
    limit_initial: int | None = None  # None: replicas × max(4, largest max_batch_size)
    limit_max: int = 10_000
    limit_backoff: float = 0.7
    limit_tolerance: float = 0.25  # queueing allowed, in service times (non-batched handlers)
    limit_batch_tolerance: int = 0  # batched handlers: full batches a request may sit out
    limit_latency_tolerance: float = 1.5  # …and interactive time at a replica ≤ this × unloaded
    queue_max: int = 1000  # requests waiting for a slot, per deployment
    queue_target_s: float = 0.02  # CoDel target queue wait (batch class)
    interactive_queue_target_s: float = 0.1  # the same for interactive: shed only if it alone overloads
    queue_interval_s: float = 0.1  # CoDel interval; also the longest wait when not overloaded
    batch_queue_share: float = 0.5  # batch-priority requests may fill at most this share
    batch_max_wait_s: float = 0.04  # a batch request never waits longer for a slot
    quarantine_crashes: float = 2.0
    quarantine_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be >= 1")
        if not 0 <= self.retry_budget_ratio <= 1 or self.retry_budget_min_per_s < 0:
            raise ConfigError("retry_budget_ratio must be in [0, 1] and retry_budget_min_per_s >= 0")
        if not 0 < self.outlier_max_ejection_share <= 1:
            raise ConfigError("outlier_max_ejection_share must be in (0, 1]")
        if not 0 < self.outlier_error_ratio <= 1 or self.outlier_error_min_requests < 1:
            raise ConfigError("outlier_error_ratio must be in (0, 1] and "
                              "outlier_error_min_requests >= 1")
        if not 0 < self.limit_backoff < 1:
            raise ConfigError("limit_backoff must be in (0, 1)")
        if self.limit_latency_tolerance != 0 and self.limit_latency_tolerance < 1:
            raise ConfigError("limit_latency_tolerance must be 0 (off) or >= 1")
        if not 0 <= self.batch_queue_share <= 1:
            raise ConfigError("batch_queue_share must be in [0, 1]")
        if min(self.retry_budget_window_s, self.per_try_timeout_min_s, self.queue_target_s,
               self.interactive_queue_target_s, self.batch_max_wait_s,
               self.queue_interval_s, self.outlier_base_ejection_s, self.quarantine_crashes) <= 0:
            raise ConfigError("resilience durations and thresholds must be > 0")
        if self.outlier_consecutive_failures < 1 or self.queue_max < 0 or self.limit_max < 1:
            raise ConfigError("outlier_consecutive_failures, limit_max >= 1 and queue_max >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ObservabilityConfig:
    access_log: bool = True  # one JSON line per request (logger steadyserve.access)
    otlp_endpoint: str | None = None  # e.g. http://127.0.0.1:4318: export traces over OTLP/HTTP
    service_name: str = "steadyserve"
    # every process also writes JSON lines to <data_dir>/logs/<process>.jsonl, which
    # `steadyserve logs` and GET /v1/logs read back (observe.logfiles)
    log_files: bool = True
    log_file_bytes: int = 8 * MiB  # one file before it is rotated
    log_file_backups: int = 2  # rotated copies kept per process
    log_dir_max_bytes: int = 256 * MiB  # the directory is pruned to this, oldest files first
    log_scan_bytes: int = 32 * MiB  # the most one query reads
    log_query_max_lines: int = 5000  # the most lines one query returns

    def __post_init__(self) -> None:
        if self.log_file_bytes < 4096 or self.log_file_backups < 0 \
                or self.log_dir_max_bytes < self.log_file_bytes or self.log_scan_bytes < 4096 \
                or self.log_query_max_lines < 1:
            raise ConfigError("[observability] need log_file_bytes >= 4096, log_file_backups "
                              ">= 0, log_dir_max_bytes >= log_file_bytes, log_scan_bytes >= "
                              "4096 and log_query_max_lines >= 1")
        if self.otlp_endpoint is not None and not self.otlp_endpoint.startswith(
                ("http://", "https://")):
            raise ConfigError("otlp_endpoint must be an http(s):// URL")


@dataclass(frozen=True, kw_only=True, slots=True)
class AlertingConfig:
    """Alert rules (the built-in defaults), notifications and automatic responses."""

    enabled: bool = True
    evaluation_interval_s: float = 5.0
    slo_target: float = 0.999  # availability SLO per deployment (error-budget burn alerts)
    webhook_urls: tuple[str, ...] = ()
    alertmanager_url: str | None = None
    dry_run: bool = False  # record what automatic responses would do, do nothing
    action_cooldown_s: float = 300.0
    actions_per_hour: int = 3
    fast_window_s: float = 60.0  # window of the fast per-replica error rule
    fast_for_s: float = 15.0  # how long it must hold before firing
    not_ready_for_s: float = 30.0  # DeploymentNotReady: no ready replica this long pages
    external_url: str = ""  # shown in notifications as where to look
    actions: tuple[tuple[str, tuple[str, ...]], ...] = ()  # rule → actions, over the defaults
    slo_min_requests: int = 100  # burn-rate alerts need this many requests in the long window
    max_silences: int = 100  # active silences at once (409 beyond)
    max_silence_bytes: int = 4096  # one silence's matchers, creator and comment, as JSON
    min_silence_s: float = 60.0
    max_silence_s: float = 30 * 86_400.0
    # points of request and latency history a starting gateway reads back at most (all
    # deployments, 3 days; ~4.5 us each to load); 0: it starts with no history
    history_restore_max_points: int = 400_000

    def __post_init__(self) -> None:
        if not 0 <= self.history_restore_max_points <= 10_000_000:
            raise ConfigError("history_restore_max_points must be in 0..10000000")
        if self.evaluation_interval_s <= 0 or self.fast_window_s <= 0 or self.fast_for_s < 0 \
                or self.not_ready_for_s < 0:
            raise ConfigError("alerting intervals must be > 0")
        if self.slo_min_requests < 0 or self.max_silences < 1 or self.max_silence_bytes < 256:
            raise ConfigError("need slo_min_requests >= 0, max_silences >= 1, "
                              "max_silence_bytes >= 256")
        if not 0 < self.min_silence_s <= self.max_silence_s:
            raise ConfigError("need 0 < min_silence_s <= max_silence_s")
        if not 0.5 < self.slo_target < 1:
            raise ConfigError("slo_target must be between 0.5 and 1, e.g. 0.999")
        for url in (*self.webhook_urls, *( [self.alertmanager_url] if self.alertmanager_url else [])):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"notification URL must be http(s)://, got {url!r}")
        if self.actions_per_hour < 0 or self.action_cooldown_s < 0:
            raise ConfigError("action guards must be >= 0")
        from .policies.actions import ACTIONS

        for rule, names in self.actions:
            unknown = [a for a in names if a not in ACTIONS]
            if unknown:
                raise ConfigError(f"[alerting] actions.{rule}: unknown action {unknown[0]!r}; "
                                  f"choose from {list(ACTIONS)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheConfig:
    """The gateway's response cache: L1 in process, optional L2 in Redis (docs/configuration.md)."""

    enabled: bool = True  # handlers still opt in with @handler(cache=True)
    l1_bytes: int = 64 * MiB
    policy: str = "tinylfu"  # tinylfu | lru
    autosize: bool = False  # let L1 pick its size in [l1_min_bytes, l1_max_bytes] from the hit-ratio curve
    l1_min_bytes: int = 8 * MiB
    l1_max_bytes: int = 512 * MiB
    autosize_interval_s: float = 60.0
    redis_url: str | None = None  # e.g. redis://127.0.0.1:6379/0: shared L2 between gateways
    redis_timeout_s: float = 0.1  # an L2 call slower than this is skipped; 3 in a row: an outage
    redis_retry_s: float = 1.0  # while L2 is down, try to reconnect this often
    redis_prefix: str = "steadyserve:"
    invalidation_ack_timeout_s: float = 1.0  # wait this long for other gateways to drop their copies
    stale_while_revalidate_s: float = 30.0  # after the TTL: serve stale at once, refresh in background
    stale_if_error_s: float = 300.0  # after the TTL: serve stale (marked) when the replicas fail
    affinity: bool = True  # route cacheable requests by key: consistent hashing with bounded loads
    affinity_balance: float = 1.25  # a replica takes at most this × the average load via affinity
    hot_keys: int = 64  # tracked for GET /v1/cache
    max_invalidation_tags: int = 1000  # tags per invalidation request (413 beyond)
    max_tag_bytes: int = 256  # one tag's length
    max_tracked_invalidations: int = 100_000  # tags whose invalidation time is remembered

    def __post_init__(self) -> None:
        if self.max_invalidation_tags < 1 or self.max_tag_bytes < 8 \
                or self.max_tracked_invalidations < self.max_invalidation_tags:
            raise ConfigError("[cache] need max_invalidation_tags >= 1, max_tag_bytes >= 8 and "
                              "max_tracked_invalidations >= max_invalidation_tags")
        from .policies.eviction import POLICIES

        if self.policy not in POLICIES:
            raise ConfigError(f"[cache] policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if self.l1_bytes < 0 or self.l1_min_bytes < 0 or self.l1_max_bytes < self.l1_min_bytes:
            raise ConfigError("[cache] need l1_bytes >= 0 and 0 <= l1_min_bytes <= l1_max_bytes")
        if self.redis_url is not None and not self.redis_url.startswith(
                ("redis://", "rediss://", "unix://")):
            raise ConfigError(f"[cache] redis_url must be redis://, rediss:// or unix://, "
                              f"got {self.redis_url!r}")
        if min(self.redis_timeout_s, self.redis_retry_s, self.autosize_interval_s) <= 0:
            raise ConfigError("[cache] redis_timeout_s, redis_retry_s, autosize_interval_s must be > 0")
        if self.invalidation_ack_timeout_s < 0:
            raise ConfigError("[cache] invalidation_ack_timeout_s must be >= 0")
        if self.stale_while_revalidate_s < 0 or self.stale_if_error_s < 0:
            raise ConfigError("[cache] stale windows must be >= 0")
        if self.affinity_balance < 1:
            raise ConfigError("[cache] affinity_balance must be >= 1")
        if self.hot_keys < 1:
            raise ConfigError("[cache] hot_keys must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class FeedbackConfig:
    """User feedback on answers (POST /v1/feedback; docs/configuration.md)."""

    max_items_per_request: int = 20  # feedback items one request may get (409 beyond)
    max_comment_chars: int = 2000
    max_value_bytes: int = 4096  # `value` and `correction`, each as JSON
    # accepted while the database is down: fsync'd to <data_dir>/spool/feedback, replayed
    spool_max_bytes: int = 64 * MiB
    # what served each answer, for feedback to join to (store.records); inputs never kept
    record_requests: bool = True
    record_sample_rate: float = 1.0  # share of answers recorded
    record_retention_s: float = 7 * 86_400.0
    max_records: int = 1_000_000
    record_queue_max: int = 10_000  # records waiting for the next write (dropped beyond)
    record_flush_s: float = 1.0
    summary_max_rows: int = 100_000  # feedback items one summary reads at most
    # feedback that marks an answer wrong (a `correction`, or `correct_key` with a score
    # <= 0) drops the answer from the response cache, here and in L2
    invalidate_cached_on_wrong: bool = True
    correct_key: str = "correct"

    def __post_init__(self) -> None:
        if self.max_items_per_request < 1 or self.max_comment_chars < 0 \
                or self.max_value_bytes < 16:
            raise ConfigError("[feedback] need max_items_per_request >= 1, max_comment_chars "
                              ">= 0 and max_value_bytes >= 16")
        if self.spool_max_bytes < 4096 or not 0 <= self.record_sample_rate <= 1 \
                or self.record_retention_s <= 0 or self.max_records < 1 \
                or self.record_queue_max < 1 or self.record_flush_s <= 0 \
                or self.summary_max_rows < 1:
            raise ConfigError("[feedback] need spool_max_bytes >= 4096, record_sample_rate in "
                              "[0, 1], record_retention_s > 0, max_records >= 1, "
                              "record_queue_max >= 1, record_flush_s > 0, summary_max_rows >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class BackupConfig:
    """Scheduled backups of the state database (store.backup; docs/configuration.md). A
    backup before a schema migration is taken whatever these say."""

    interval_s: float = 0.0  # 0: no scheduled backups
    keep: int = 7  # scheduled backups kept; the oldest beyond are deleted
    dir: str | None = None  # None: <data_dir>/backups

    def __post_init__(self) -> None:
        if not (self.interval_s == 0 or self.interval_s >= 1):
            raise ConfigError("[backup] interval_s must be 0 (off) or at least 1")
        if self.keep < 1:
            raise ConfigError("[backup] keep must be >= 1")
        if self.dir is not None and not (isinstance(self.dir, str) and 0 < len(self.dir) <= 4096):
            raise ConfigError("[backup] dir must be a path of 1 to 4096 characters")


@dataclass(frozen=True, kw_only=True, slots=True)
class JobsConfig:
    """Asynchronous inference jobs (POST /v1/jobs/...; gateway.jobs; docs/configuration.md)."""

    enabled: bool = True
    max_queued: int = 10_000  # jobs queued or running at once, all keys (503 beyond)
    max_queued_per_key: int = 1_000  # … per API key (the open, keyless caller is one key)
    max_input_bytes: int = 1 * MiB  # a job's parameters as JSON (413 beyond)
    max_result_bytes: int = 1 * MiB  # a larger result fails the job (result_too_large)
    default_timeout_s: float = 3600.0  # a job's deadline after submission (X-Job-Timeout-S)
    max_timeout_s: float = 86_400.0
    max_failures: int = 5  # failed runs before a job is dead (the dead letter)
    retry_base_s: float = 1.0  # a failed run is tried again after ~this, doubling…
    retry_cap_s: float = 60.0  # …up to this
    lease_s: float = 30.0  # a running job whose gateway stops renewing this long is retried
    poll_s: float = 0.5  # an idle gateway looks at the queue this often
    max_running: int = 32  # jobs this gateway runs at once
    capacity_share: float = 0.5  # jobs start while a deployment is under this share of its limit
    retention_s: float = 7 * 86_400.0  # finished jobs (and their results) are kept this long…
    max_finished: int = 100_000  # …and at most this many (the oldest go first)
    max_list: int = 1000  # jobs one GET /v1/jobs returns at most
    # webhooks: only to these hosts (SSRF); signed with HMAC-SHA256
    webhook_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    max_webhook_url_chars: int = 2048
    webhook_secret: str = field(default="", repr=False)  # "": read webhook_secret_file
    webhook_secret_file: str = "webhook.secret"  # under data_dir unless absolute; made if missing
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 10
    webhook_retry_base_s: float = 1.0
    webhook_retry_cap_s: float = 300.0
    webhook_concurrency: int = 8  # deliveries in flight per gateway

    def __post_init__(self) -> None:
        if self.max_queued < 1 or self.max_queued_per_key < 1 or self.max_running < 1 \
                or self.max_finished < 1 or self.max_list < 1:
            raise ConfigError("[jobs] need max_queued, max_queued_per_key, max_running, "
                              "max_finished and max_list >= 1")
        if self.max_input_bytes < 16 or self.max_result_bytes < 16:
            raise ConfigError("[jobs] need max_input_bytes and max_result_bytes >= 16")
        if not 0 < self.default_timeout_s <= self.max_timeout_s:
            raise ConfigError("[jobs] need 0 < default_timeout_s <= max_timeout_s")
        if self.max_failures < 1 or self.retry_base_s <= 0 or self.retry_cap_s < self.retry_base_s:
            raise ConfigError("[jobs] need max_failures >= 1 and 0 < retry_base_s <= retry_cap_s")
        if self.lease_s < 1 or not 0 < self.poll_s <= self.lease_s / 3:
            raise ConfigError("[jobs] need lease_s >= 1 and 0 < poll_s <= lease_s / 3 (a lease "
                              "is renewed three times per lease_s)")
        if not 0 < self.capacity_share <= 1:
            raise ConfigError("[jobs] capacity_share must be in (0, 1]")
        if self.retention_s <= 0:
            raise ConfigError("[jobs] retention_s must be > 0")
        if not all(isinstance(h, str) and 0 < len(h) <= 255 for h in self.webhook_hosts) \
                or len(self.webhook_hosts) > 1000:
            raise ConfigError("[jobs] webhook_hosts: at most 1000 host names, IP literals, "
                              "host:port, *.domain or *")
        if self.max_webhook_url_chars < 16:
            raise ConfigError("[jobs] max_webhook_url_chars must be >= 16")
        if self.webhook_secret and len(self.webhook_secret) < 16:
            raise ConfigError("[jobs] webhook_secret must be at least 16 characters")
        if not self.webhook_secret_file or "\0" in self.webhook_secret_file:
            raise ConfigError("[jobs] webhook_secret_file must be a file name")
        if self.webhook_timeout_s <= 0 or self.webhook_max_attempts < 1 \
                or self.webhook_retry_base_s <= 0 \
                or self.webhook_retry_cap_s < self.webhook_retry_base_s \
                or self.webhook_concurrency < 1:
            raise ConfigError("[jobs] need webhook_timeout_s > 0, webhook_max_attempts >= 1, "
                              "0 < webhook_retry_base_s <= webhook_retry_cap_s and "
                              "webhook_concurrency >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    deployments: tuple[DeploymentConfig, ...]
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    alerting: AlertingConfig = field(default_factory=AlertingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    database_url: str | None = None  # None: sqlite:///<data_dir>/steadyserve.db
    # the GPUs local replicas may be given (indices or UUIDs, as CUDA_VISIBLE_DEVICES takes
    # them); None: the gateway's CUDA_VISIBLE_DEVICES, else what nvidia-smi lists
    gpus: tuple[str, ...] | None = None
    backend: str = "local"  # local: replica processes of this machine; ray: Ray actors
    ray_address: str | None = None  # backend = "ray": None starts a local Ray cluster
    data_dir: str = ".steadyserve"
    log_level: str = "info"
    log_format: str = "auto"  # json | text | auto (text on a terminal)

    def __post_init__(self) -> None:
        if not self.deployments:
            raise ConfigError("at least one deployment is needed")
        if self.gpus is not None and (len(self.gpus) > 1024 or not all(
                _GPU.fullmatch(g) for g in self.gpus)):
            raise ConfigError("gpus: a list of device indices or UUIDs (at most 1024), e.g. "
                              '["0", "1"]')
        names = [d.name for d in self.deployments]
        for d in self.deployments:
            unknown = [c for c in d.calls if c not in names]
            if unknown:
                raise ConfigError(f"deployment {d.name}: calls names {unknown}, which are not "
                                  f"configured deployments ({names})")
            if d.shadow is not None and d.shadow not in names:
                raise ConfigError(f"deployment {d.name}: shadow {d.shadow!r} is not a "
                                  f"configured deployment ({names})")
            if d.canary is not None:
                cand = d.canary.deployment
                if cand == d.name or cand not in names:
                    raise ConfigError(f"[deployments.{d.name}.canary] deployment {cand!r} must "
                                      f"name another configured deployment ({names})")
                if any(o.canary is not None for o in self.deployments if o.name == cand):
                    raise ConfigError(f"[deployments.{d.name}.canary]: the candidate {cand!r} "
                                      "has a canary of its own; a candidate must be a leaf")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"duplicate deployment names: {dupes}")
        self._check_mirror_loops()
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.log_format not in ("json", "text", "auto"):
            raise ConfigError("log_format must be json, text or auto")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")

    def _check_mirror_loops(self) -> None:
        """A shadow copy goes to its candidate straight (not mirrored or split again), but its
        child calls are requests like any other: mirrored where they reach a shadowed
        deployment, sent to a canary's candidate where it splits. A shadow that leads back
        that way to the deployment it mirrors would mirror every request again, until
        max_call_depth: refused. Walked over (deployment, arrived as a shadow copy or a
        canary's split) states."""
        by_name = {d.name: d for d in self.deployments}

        def onward(name: str, routed: bool) -> list[tuple[str, bool]]:
            d = by_name[name]
            out = [(c, True) for c in d.calls]  # a child call: through the routes
            if routed and d.shadow is not None:
                out.append((d.shadow, False))
            if routed and d.canary is not None:
                out.append((d.canary.deployment, False))
            return out

        for d in self.deployments:
            if d.shadow is None:
                continue
            start = (d.shadow, False)
            came_from: dict[tuple[str, bool], tuple[str, bool]] = {start: (d.name, True)}
            todo = [start]
            while todo and (d.name, True) not in came_from:
                here = todo.pop()
                for there in onward(*here):
                    if there not in came_from:
                        came_from[there] = here
                        todo.append(there)
            if (d.name, True) in came_from:
                path, at = [d.name], came_from[(d.name, True)]
                while at != (d.name, True):
                    path.append(at[0])
                    at = came_from[at]
                path.append(d.name)
                raise ConfigError(
                    f"deployment {d.name}: its shadow leads back to it ({' → '.join(reversed(path))}"
                    "): every mirrored request would be mirrored again; a shadow candidate may "
                    "not call the deployment it shadows")

    def deployment(self, name: str) -> DeploymentConfig:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def log_dir(self) -> str | None:
        """Where every process writes its log file; None when `log_files` is off."""
        return os.path.join(self.data_dir, "logs") if self.observability.log_files else None

    def log_sink(self, process: str) -> FileSink | None:
        if self.log_dir is None:
            return None
        from .observe.logfiles import file_name

        obs = self.observability
        return FileSink(os.path.join(self.log_dir, file_name(process)), obs.log_file_bytes,
                        obs.log_file_backups)

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir}/steadyserve.db"

    @property
    def total_replicas(self) -> int:
        return sum(d.replicas for d in self.deployments)
