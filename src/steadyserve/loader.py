"""Import a service class from 'path/to/file.py:Class' or 'package.module:Class'."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import ConfigError
from .service import Service


def load_service_class(target: str) -> type[Service]:
    module_part, _, class_name = target.rpartition(":")
    if not module_part or not class_name:
        raise ConfigError(f"service must look like 'file.py:Class' or 'module:Class', got {target!r}")
    if module_part.endswith(".py") or "/" in module_part:
        path = Path(module_part).resolve()
        if not path.is_file():
            raise ConfigError(f"service file not found: {path}")
        sys.path.insert(0, str(path.parent))  # let the service import its neighbours
        name = f"steadyserve_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise ConfigError(f"cannot import module {module_part!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise ConfigError(f"{target}: {class_name!r} is not a steadyserve.Service subclass")
    return cls
