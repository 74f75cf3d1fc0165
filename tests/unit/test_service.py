"""service.py: the @handler decorator, HandlerOptions validation, handler_specs, HandlerSpec wire."""

from __future__ import annotations

import dataclasses

import pytest

from steadyserve import codec
from steadyserve.errors import ConfigError
from steadyserve.service import HandlerOptions, HandlerSpec, Service, handler, handler_specs


class Echo(Service):
    @handler
    def echo(self, text: str, times: int = 1) -> str:
        return text * times

    @handler(batch=True, max_batch_size=16, max_wait_s=0.002, openai="embeddings")
    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[0.0] for _ in texts]

    @handler()
    def ping(self) -> str:
        return "pong"

    def not_a_handler(self, x: int) -> int:
        return x

    def setup(self) -> None:
        self.ready = True


class Child(Echo):
    @handler(idempotent=False, timeout_s=5)
    def extra(self, n: int) -> int:
        return n


def test_handler_specs_finds_both_decorator_forms():
    specs = handler_specs(Echo)
    assert sorted(specs) == ["echo", "embed", "ping"]
    assert specs["echo"].options == HandlerOptions()
    assert specs["ping"].options == HandlerOptions()
    assert specs["embed"].options == HandlerOptions(
        batch=True, max_batch_size=16, max_wait_s=0.002, openai="embeddings")


def test_handler_specs_describes_params():
    specs = handler_specs(Echo)
    assert specs["echo"].params == [
        {"name": "text", "type": {"kind": "str"}, "required": True},
        {"name": "times", "type": {"kind": "int"}, "required": False},
    ]
    assert specs["embed"].params == [
        {"name": "texts", "type": {"kind": "list", "item": {"kind": "str"}}, "required": True},
    ]
    assert specs["ping"].params == []
    assert all(spec.name == name for name, spec in specs.items())


def test_handler_specs_includes_inherited_handlers():
    specs = handler_specs(Child)
    assert sorted(specs) == ["echo", "embed", "extra", "ping"]
    assert specs["extra"].options.idempotent is False
    assert specs["extra"].options.timeout_s == 5


def test_decorator_returns_the_function_itself():
    def f(self, x: int) -> int:
        return x + 1

    assert handler(f) is f
    assert handler(batch=False)(f) is f
    assert f(None, 1) == 2


def test_decorated_method_still_callable():
    assert Echo().echo("ab", times=2) == "abab"


class TwoParamsBatch(Service):
    @handler(batch=True)
    def embed(self, texts: list[str], normalize: bool = True) -> list[float]:
        return []


class ScalarBatch(Service):
    @handler(batch=True)
    def embed(self, text: str) -> list[float]:
        return []


class NoParamBatch(Service):
    @handler(batch=True)
    def embed(self) -> list[float]:
        return []


class OptionalListBatch(Service):
    @handler(batch=True)
    def embed(self, texts: list[str] | None) -> list[float]:
        return []


class NoHandlers(Service):
    def echo(self, text: str) -> str:
        return text


class VarArgs(Service):
    @handler
    def echo(self, *texts: str) -> str:
        return ""


class BadType(Service):
    @handler
    def echo(self, texts: set[str]) -> str:
        return ""


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        pytest.param(TwoParamsBatch, r"TwoParamsBatch\.embed: a batched handler takes exactly one",
                     id="batch-two-params"),
        pytest.param(ScalarBatch, r"ScalarBatch\.embed: a batched handler", id="batch-non-list-param"),
        pytest.param(NoParamBatch, r"NoParamBatch\.embed: a batched handler", id="batch-no-param"),
        pytest.param(OptionalListBatch, r"OptionalListBatch\.embed: a batched handler",
                     id="batch-optional-list"),
        pytest.param(NoHandlers, "NoHandlers has no @handler methods", id="no-handlers"),
        pytest.param(Service, "Service has no @handler methods", id="bare-service"),
        pytest.param(VarArgs, r"\*args", id="var-args"),
        pytest.param(BadType, "unsupported parameter type", id="unsupported-type"),
    ],
)
def test_malformed_services_are_refused(cls, match):
    with pytest.raises(ConfigError, match=match):
        handler_specs(cls)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(max_batch_size=0), "max_batch_size must be >= 1", id="max-batch-0"),
        pytest.param(dict(max_wait_s=-0.001), "max_wait_s must be >= 0", id="negative-max-wait"),
        pytest.param(dict(timeout_s=0), "timeout_s must be > 0", id="timeout-0"),
        pytest.param(dict(max_inputs=0), "max_inputs must be >= 1", id="max-inputs-0"),
        pytest.param(dict(openai="images"), "openai= must be one of", id="openai-images"),
        pytest.param(dict(stream=True, batch=True), "streaming handler", id="stream-batch"),
        pytest.param(dict(openai=""), "openai= must be one of", id="openai-empty"),
    ],
)
def test_handler_options_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HandlerOptions(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(max_batch_size=0), "max_batch_size", id="decorator-form"),
        pytest.param(dict(openai="images"), "openai=", id="decorator-openai"),
    ],
)
def test_handler_decorator_validates_at_decoration(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        handler(**kwargs)


def test_handler_decorator_rejects_unknown_option():
    with pytest.raises(TypeError):
        handler(batch_size=4)


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_wait_s=0.0), dict(max_batch_size=1), dict(openai=None), dict(openai="embeddings"),
     dict(openai="chat"), dict(openai="completions")],
    ids=["zero-wait", "batch-1", "openai-none", "openai-embeddings", "openai-chat",
         "openai-completions"],
)
def test_handler_options_edges_accepted(kwargs):
    opts = HandlerOptions(**kwargs)
    for key, value in kwargs.items():
        assert getattr(opts, key) == value


def test_handler_options_defaults():
    assert dataclasses.asdict(HandlerOptions()) == {
        "batch": False, "max_batch_size": 32, "max_wait_s": 0.0, "timeout_s": 60.0,
        "idempotent": True, "max_inputs": 2048, "max_queue": 8192, "openai": None, "hedge": False,
        "canary": None, "per_try_timeout_s": None, "cache": False, "cache_ttl_s": 300.0,
        "cache_tags": (), "invalidates": (), "affinity": None, "stream": False,
    }


@pytest.mark.parametrize("name", ["echo", "embed", "ping"])
def test_handler_spec_wire_round_trip(name):
    spec = handler_specs(Echo)[name]
    wire = spec.to_wire()
    assert set(wire) == {"name", "options", "params"}
    assert HandlerSpec.from_wire(wire) == spec


@pytest.mark.parametrize("name", ["echo", "embed", "ping"])
def test_handler_spec_round_trip_through_codec(name):
    spec = handler_specs(Echo)[name]
    assert HandlerSpec.from_wire(codec.decode(codec.encode(spec.to_wire()))) == spec


def test_handler_spec_from_wire_validates_options():
    wire = handler_specs(Echo)["echo"].to_wire()
    wire["options"]["max_batch_size"] = 0
    with pytest.raises(ConfigError, match="max_batch_size"):
        HandlerSpec.from_wire(wire)


def test_service_defaults():
    s = Service()
    assert Service.version == "1"
    assert s.setup() is None
    assert s.teardown() is None
