"""Every strategy a name can refer to: the built-ins (importing them registers them) and strategies loaded from a
module or file. Kept apart from ``strategy.py`` (the API the built-ins are written against), so that neither imports
the other's dependants."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import busserve.router.strategies  # noqa: F401 - registers the built-ins
from busserve.router.strategy import BUILTINS, StrategyFn, parameters

__all__ = ["BUILTINS", "load_strategy"]


def load_strategy(target: str) -> StrategyFn:
    """A built-in name, ``package.module:function`` or ``path/to/file.py:function``."""
    if target in BUILTINS:
        return BUILTINS[target]
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise ValueError(f"unknown strategy {target!r}; built-ins: {', '.join(sorted(BUILTINS))}; "
                         "or give MODULE:FUNCTION")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name).resolve()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if fn is None or not inspect.iscoroutinefunction(fn):
        raise ValueError(f"{target}: {attr!r} is not an async function in {module_name}")
    parameters(fn)  # validates the signature
    return fn  # type: ignore[no-any-return]
