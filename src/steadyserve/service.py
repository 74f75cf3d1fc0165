"""How a user writes a service: subclass `Service`, load weights in `setup()`, decorate handlers.

    class Echo(steadyserve.Service):
        def setup(self) -> None: ...          # once per replica, before it is ready

        @steadyserve.handler                  # POST /v1/deployments/<name>/echo {"text": "hi"}
        def echo(self, text: str) -> dict: ...

        @steadyserve.handler(batch=True, max_batch_size=32)
        def embed(self, texts: list[str]) -> list[list[float]]: ...   # a list in, a list out

A handler that is a generator (`def` with `yield`, or `async def` with `yield`) streams: each
item goes to the client as it is produced (NDJSON, or server-sent events by `Accept`), and a
client that disconnects stops it between items.

Type hints become the request schema. A batched handler takes exactly one `list[T]`
parameter and must return one result per item; items of concurrent requests are merged
into one call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

from .errors import ConfigError
from .schema import describe_params

if TYPE_CHECKING:
    from .compose import Call, DeploymentHandle

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__steadyserve_handler__"
OPENAI_KINDS = ("embeddings", "completions", "chat")


@dataclass(frozen=True, kw_only=True, slots=True)
class HandlerOptions:
    batch: bool = False
    max_batch_size: int = 32
    max_wait_s: float = 0.0
    timeout_s: float = 60.0
    idempotent: bool = True
    max_inputs: int = 2048
    max_queue: int = 8192  # items waiting in the replica's batch queue at most (503 beyond)
    openai: str | None = None
    hedge: bool = False  # after the observed p95, send a second attempt to another replica
    per_try_timeout_s: float | None = None  # None: the whole deadline (adaptive when hedging)
    canary: dict[str, Any] | None = None  # tiny request the deep health check sends
    # response cache (gateway): per item for batched handlers, keyed by deployment, handler,
    # model version and the canonical input
    cache: bool = False
    cache_ttl_s: float = 300.0  # fresh this long; then stale windows from the [cache] config
    cache_tags: tuple[str, ...] = ()  # templates, e.g. "account:{account_id}", from the input
    invalidates: tuple[str, ...] = ()  # after a success, drop entries with these tags everywhere
    affinity: str | None = None  # input field whose value routes to the same replica (cache)
    # a generator (sync or async): its items are streamed (NDJSON or server-sent events);
    # set by `handler_specs` from the function, never by hand
    stream: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError("max_batch_size must be >= 1")
        if self.max_wait_s < 0:
            raise ConfigError("max_wait_s must be >= 0")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s must be > 0")
        if self.max_inputs < 1:
            raise ConfigError("max_inputs must be >= 1")
        if self.max_queue < self.max_inputs:
            raise ConfigError("max_queue must be >= max_inputs (one request must fit)")
        if self.per_try_timeout_s is not None and self.per_try_timeout_s <= 0:
            raise ConfigError("per_try_timeout_s must be > 0")
        if self.hedge and not self.idempotent:
            raise ConfigError("hedge=True needs an idempotent handler")
        if self.cache and not self.idempotent:
            raise ConfigError("cache=True needs an idempotent handler")
        if self.cache_ttl_s <= 0:
            raise ConfigError("cache_ttl_s must be > 0")
        for template in (*self.cache_tags, *self.invalidates):
            if not isinstance(template, str) or not template:
                raise ConfigError(f"cache tags must be non-empty strings, got {template!r}")
        if self.stream and (self.batch or self.cache or self.hedge or self.invalidates):
            raise ConfigError("a streaming handler (a generator) cannot be batch=, cache=, "
                              "hedge= or invalidates=")
        if self.openai is not None and self.openai not in OPENAI_KINDS:
            raise ConfigError(f"openai= must be one of {OPENAI_KINDS}, got {self.openai!r}")


@overload
def handler(fn: F, /) -> F: ...
@overload
def handler(
    *, batch: bool = ..., max_batch_size: int = ..., max_wait_s: float = ...,
    timeout_s: float = ..., idempotent: bool = ..., max_inputs: int = ..., max_queue: int = ...,
    openai: str | None = ...,
    hedge: bool = ..., canary: dict[str, Any] | None = ..., per_try_timeout_s: float | None = ...,
    cache: bool = ..., cache_ttl_s: float = ..., cache_tags: tuple[str, ...] | list[str] = ...,
    invalidates: tuple[str, ...] | list[str] = ..., affinity: str | None = ...,
) -> Callable[[F], F]: ...


def handler(fn: Any = None, /, **options: Any) -> Any:
    """Mark a method as a handler. Options: see `HandlerOptions`."""
    for name in ("cache_tags", "invalidates"):
        if isinstance(options.get(name), (list, str)):
            value = options[name]
            options[name] = (value,) if isinstance(value, str) else tuple(value)
    opts = HandlerOptions(**options)

    def mark(f: F) -> F:
        setattr(f, _MARK, opts)
        return f

    return mark(fn) if fn is not None else mark


class Service:
    """Base class of a user service. One instance per replica process."""

    #: reported to clients and part of cache keys; bump it when the model changes
    version: ClassVar[str] = "1"

    def setup(self) -> None:
        """Load weights and warm up; runs once per replica, off the event loop."""

    def teardown(self) -> None:
        """Release resources at shutdown."""

    def deployment(self, name: str) -> DeploymentHandle:
        """A handle on another deployment of this gateway (steadyserve.compose): call its
        handlers with this request's deadline, priority, trace and credential."""
        from .compose import DeploymentHandle

        caller = getattr(self, "_steadyserve_children", None)
        if caller is None:
            raise ConfigError("child calls are available once the replica serves (not in "
                              "setup() or outside steadyserve)")
        return DeploymentHandle(caller, name)

    def gather(self, calls: dict[str, Call], *, branch_timeout_s: float | None = None,
               partial: bool = False) -> dict[str, Any]:
        """Several child calls at once, from a sync handler (async ones await
        `steadyserve.gather`): see steadyserve.compose.gather."""
        from .compose import gather_sync

        caller = getattr(self, "_steadyserve_children", None)
        if caller is None:
            raise ConfigError("child calls are available once the replica serves")
        return gather_sync(caller, calls, branch_timeout_s=branch_timeout_s, partial=partial)

    def invalidate(self, tags: list[str]) -> None:
        """Drop cached intermediate results carrying any of these tags (e.g. "account:42").

        The gateway calls it on every replica after a handler declared with `invalidates=`
        succeeds, and when another gateway publishes an invalidation; it runs on the event
        loop, so it must be quick (a dict operation, no I/O). The tag "*" means everything
        tagged: it comes after the gateway may have missed invalidations (a Redis outage)."""


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    name: str
    options: HandlerOptions
    params: list[dict[str, Any]]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "options": asdict(self.options), "params": self.params}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> HandlerSpec:
        options = dict(body["options"])
        for name in ("cache_tags", "invalidates"):
            if name in options:
                options[name] = tuple(options[name])
        return cls(str(body["name"]), HandlerOptions(**options), list(body["params"]))


def handler_specs(service_cls: type[Service]) -> dict[str, HandlerSpec]:
    """Find and describe every handler of a service class; refuse malformed ones at start."""
    specs: dict[str, HandlerSpec] = {}
    for name in dir(service_cls):
        fn = getattr(service_cls, name, None)
        opts = getattr(fn, _MARK, None)
        if not isinstance(opts, HandlerOptions) or fn is None:
            continue
        params = describe_params(fn)
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            try:
                opts = replace(opts, stream=True)
            except ConfigError as exc:
                raise ConfigError(f"{service_cls.__name__}.{name}: {exc.message}") from None
        if opts.batch:
            if len(params) != 1 or params[0]["type"]["kind"] != "list":
                raise ConfigError(
                    f"{service_cls.__name__}.{name}: a batched handler takes exactly one "
                    "list[...] parameter (the items) and returns one result per item"
                )
        specs[name] = HandlerSpec(name, opts, params)
    if not specs:
        raise ConfigError(f"{service_cls.__name__} has no @handler methods")
    return specs
