"""Plugin loading: built-ins first, then the `optima` entry-point group.

Every component ends up as a gin configurable before any gin file is parsed,
so "No configurable matching ..." can only mean a typo (see `optima.config`).
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

import pluggy

from optima import hookspecs
from optima.errors import OptimaError

ENTRY_POINT_GROUP = "optima"
BUILTIN = "optima.builtin"
#: component kind -> the hook that registers it
HOOKS = {
    "model": "optima_register_models",
    "task": "optima_register_tasks",
    "head": "optima_register_heads",
    "policy": "optima_register_policies",
    "reward": "optima_register_rewards",
    "loss": "optima_register_losses",
}


class PluginError(OptimaError):
    """A plugin is malformed (misspelled hook, duplicate component)."""


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable
    plugin: str

    @property
    def gin_name(self) -> str:
        return f"{self.name}_{self.kind}"


@dataclass
class Registry:
    manager: pluggy.PluginManager
    components: dict[str, Component] = field(default_factory=dict)  # by gin name
    #: plugins that failed to load or register: name -> one-line error
    failures: dict[str, str] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[Component]:
        return [c for c in self.components.values() if c.kind == kind]

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.manager.list_name_plugin()]


def plugins_disabled() -> bool:
    return os.environ.get("OPTIMA_DISABLE_PLUGINS", "") not in ("", "0")


def load(*, external: bool | None = None) -> Registry:
    """Load built-ins and (unless disabled) entry-point plugins; collect components.

    A plugin that fails to import or raises in a hook is recorded in
    `Registry.failures` and skipped; a misspelled hook or a duplicate component
    name raises `PluginError`.
    """
    from optima.plugins import builtin

    external = not plugins_disabled() if external is None else external
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name=BUILTIN)
    registry = Registry(pm)
    if external:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as e:  # a broken plugin must not break the rest
                registry.failures[ep.name] = _one_line(e)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {e.plugin_name!r}: {e}; valid hooks: {', '.join(HOOKS.values())}") from None

    for kind, hook_name in HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name in registry.failures:
                continue
            try:
                impl.function(register=_registrar(registry, kind, impl.plugin_name))
            except PluginError:
                raise
            except Exception as e:
                registry.failures[impl.plugin_name] = f"{hook_name}: {_one_line(e)}"
    return registry


def _registrar(registry: Registry, kind: str, plugin: str):
    def register(name: str, factory: Callable) -> None:
        component = Component(kind, name, factory, plugin)
        previous = registry.components.get(component.gin_name)
        if previous is not None:
            raise PluginError(f"{kind} {name!r} is registered by both {previous.plugin!r} and {plugin!r}; "
                              f"uninstall or rename one of them")
        registry.components[component.gin_name] = component
    return register


def _one_line(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}".replace("\n", " ")
