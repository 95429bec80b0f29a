"""Where job kinds are found by name, and how user packages add their own.

A kind becomes known by being registered when its module is imported. Services import those modules
once at start with :func:`load_kinds`: every entry point in the ``jobstream.kinds`` group (jobstream's
own built-in kinds are one) plus the module names from ``JOBSTREAM_KIND_MODULES``. A user package
therefore adds kinds either by declaring, in its ``pyproject.toml``::

    [project.entry-points."jobstream.kinds"]
    mykinds = "mypackage.kinds"

or, without packaging, by setting ``JOBSTREAM_KIND_MODULES=mypackage.kinds``. An entry point may also
name a JobKind class or instance (``"mypackage.kinds:Resize"``); it is then registered directly.

Every service must load the same kinds: the gateway validates params with them, the scheduler splits
and merges with them, the worker runs them.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any, TypeVar, overload

from jobstream.errors import InvalidArgument
from jobstream.kinds.api import JobKind
from jobstream.kinds.params import ParamSpec

__all__ = ["ENTRY_POINT_GROUP", "get_kind", "kind_names", "load_kinds", "register"]

ENTRY_POINT_GROUP = "jobstream.kinds"

_log = logging.getLogger(__name__)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")
_kinds: dict[str, JobKind] = {}
_lock = threading.Lock()

K = TypeVar("K", bound=JobKind)


@overload
def register(kind: type[K]) -> type[K]: ...


@overload
def register(kind: K) -> K: ...


def register(kind: type[K] | K) -> type[K] | K:
    """Makes a kind available by its ``name``; returns its argument so it also works as a decorator.

    Given a class, registers an instance of it (created with no arguments). Registering the same
    object, or the same class, again is a no-op, so re-importing a module is harmless; registering a
    different kind under a taken name raises ValueError, because silently replacing a kind would
    change what running jobs do.
    """
    if isinstance(kind, type):
        if not issubclass(kind, JobKind):
            raise TypeError(f"register() needs a JobKind subclass or instance, got {kind!r}")
        if type(_kinds.get(str(getattr(kind, "name", "")))) is kind:
            return kind
        instance: JobKind = kind()
    elif isinstance(kind, JobKind):
        instance = kind
    else:
        raise TypeError(f"register() needs a JobKind subclass or instance, got {kind!r}")
    name = getattr(instance, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{type(instance).__name__}.name must be 1-100 letters, digits, '_', '.', '-', got {name!r}")
    if not isinstance(getattr(instance, "params", None), ParamSpec):
        raise ValueError(f"{type(instance).__name__}.params must be a ParamSpec (ParamSpec() for none)")
    with _lock:
        existing = _kinds.get(name)
        if existing is None:
            _kinds[name] = instance
        elif not (existing is kind or (isinstance(kind, type) and type(existing) is kind)):
            raise ValueError(
                f"job kind {name!r} is already registered by {type(existing).__module__}.{type(existing).__qualname__}"
            )
    return kind


def get_kind(name: str) -> JobKind:
    """Returns the kind registered under ``name``; raises InvalidArgument naming the known kinds."""
    kind = _kinds.get(name)
    if kind is None:
        known = ", ".join(kind_names()) or "none (were the kinds loaded?)"
        raise InvalidArgument(f"unknown job kind {name!r}; known kinds: {known}", field="kind")
    return kind


def kind_names() -> list[str]:
    """Registered kind names, sorted."""
    return sorted(_kinds)


def load_kinds(extra_modules: Iterable[str] = ()) -> None:
    """Imports every ``jobstream.kinds`` entry point and each extra module; safe to call repeatedly.

    Raises ImportError naming the entry point or module that failed, so a service with a broken
    plugin stops at start instead of refusing that kind's jobs later.
    """
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:
            raise ImportError(f"job kind entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        _register_loaded(loaded)
    for module in extra_modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ImportError(f"job kind module {module!r} failed to import: {exc}") from exc
    _log.debug("job kinds loaded: %s", ", ".join(kind_names()))


def _register_loaded(obj: Any) -> None:
    # An entry point naming a module registers through the module's import; one naming a kind class
    # or instance is registered here.
    if isinstance(obj, JobKind) or (isinstance(obj, type) and issubclass(obj, JobKind)):
        register(obj)
