"""The public surface of `steadyserve`: pinned so a change to it is deliberate."""

from __future__ import annotations

import importlib

import pytest

import steadyserve

EXPECTED_ALL = [
    "AsyncClient",
    "Client",
    "ClientError",
    "ConfigError",
    "Failed",
    "HandlerOptions",
    "NotFound",
    "Overloaded",
    "ReplicaError",
    "RetryableError",
    "Service",
    "SteadyError",
    "__version__",
    "gather",
    "handler",
]


def test_all_is_pinned():
    assert steadyserve.__all__ == EXPECTED_ALL


def test_all_is_sorted_without_duplicates():
    assert steadyserve.__all__ == sorted(set(steadyserve.__all__))


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_is_importable(name):
    module = importlib.import_module("steadyserve")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from steadyserve import {name}", namespace)
    assert namespace[name] is getattr(steadyserve, name)


def test_star_import_gives_exactly_all():
    namespace: dict[str, object] = {}
    exec("from steadyserve import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(EXPECTED_ALL)


def test_version_is_a_dotted_string():
    parts = steadyserve.__version__.split(".")
    assert len(parts) == 3
    assert all(p.isdigit() for p in parts)


@pytest.mark.parametrize(
    ("name", "module"),
    [("ClientError", "steadyserve.errors"), ("Service", "steadyserve.service"),
     ("handler", "steadyserve.service"), ("HandlerOptions", "steadyserve.service")],
)
def test_public_names_are_the_real_objects(name, module):
    assert getattr(steadyserve, name) is getattr(importlib.import_module(module), name)


def test_service_code_does_not_load_the_client():
    import subprocess
    import sys

    code = "import sys, steadyserve; print('steadyserve.client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "False"
