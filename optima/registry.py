"""Plugin loading: built-ins first, then the `optima` entry-point group, then a
check that every hook implementation matches a specification.

- A plugin that raises on import, or in one of its hooks, is recorded in
  `Registry.failures` (name -> one-line error) and skipped as a whole; the rest
  goes on.
- A malformed plugin (a hook that has no specification, e.g. a misspelling; a
  component registered under a name another plugin already took; two plugins
  under one entry-point name) is an error: `load()` raises `PluginError` naming
  it, or with `strict=False` records it in `Registry.errors` and skips the
  plugin. `optima run` loads with `strict=False` and warns (a broken package
  must not stop runs that do not use it); `optima plugins` exits 2.
- A plugin that implements no hook at all (e.g. `optima_registr_policies`, a
  prefix no hook matches, so it is not even seen as a misspelled hook) loads
  but adds nothing: recorded in `Registry.warnings`.
- `OPTIMA_DISABLE_PLUGINS=1` loads built-ins only; a comma-separated list of
  entry-point names skips just those.

Every component ends up as a gin configurable before any gin file is parsed
(see `optima.config`), so "No configurable matching ..." can only mean a typo.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable, Sequence

import pluggy

from optima import hookspecs
from optima.errors import OptimaError, warning

ENTRY_POINT_GROUP = "optima"
BUILTIN = "optima.builtin"
#: the module of the built-in plugin (`plugins/builtin.py`)
BUILTIN_MODULE = "optima.plugins.builtin"
DISTRIBUTION = "optima-distill"
DISABLE_VARIABLE = "OPTIMA_DISABLE_PLUGINS"
#: component kind -> the hook that registers it
HOOKS = {
    "model": "optima_register_models",
    "task": "optima_register_tasks",
    "head": "optima_register_heads",
    "policy": "optima_register_policies",
    "reward": "optima_register_rewards",
    "loss": "optima_register_losses",
    "environment": "optima_register_bandit_environments",
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_UNMARKED_PREFIX = "optima_register_"


class PluginError(OptimaError):
    """A plugin is malformed (misspelled hook, duplicate component or plugin name)."""


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable
    plugin: str
    #: models only: the names of the model's modules, in order, if declared
    modules: tuple[str, ...] | None = None

    @property
    def gin_name(self) -> str:
        return f"{self.name}_{self.kind}"

    @property
    def doc(self) -> str:
        """The first sentence of the factory's docstring."""
        paragraph = " ".join((inspect.getdoc(self.factory) or "").strip().split("\n\n")[0].split())
        return re.split(r"(?<=[\w)`'\"])\.\s+(?=[A-Z`])", paragraph, maxsplit=1)[0].rstrip(".") + "." \
            if paragraph else ""


@dataclass
class PluginInfo:
    name: str
    #: what was imported: an entry point's value (`pkg.module`), or a module name
    module: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    #: hooks it implements, in `HOOKS` order
    hooks: tuple[str, ...] = ()
    #: "ok", "failed" (raised on import or in a hook), "invalid" (malformed) or "disabled"
    status: str = "ok"
    error: str | None = None


@dataclass
class Registry:
    manager: pluggy.PluginManager
    #: every plugin seen, loaded or not, in load order
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    components: dict[str, Component] = field(default_factory=dict)  # by gin name
    #: malformed plugins, skipped (only filled with `strict=False`; `strict` raises the first)
    errors: list[str] = field(default_factory=list)
    #: plugins that loaded but add nothing (no hook implemented)
    warnings: list[str] = field(default_factory=list)
    external: bool = True

    @property
    def failures(self) -> dict[str, str]:
        """Plugins that raised on import or in a hook: name -> one-line error."""
        return {p.name: p.error or "" for p in self.plugins.values() if p.status == "failed"}

    def warning_lines(self, malformed: bool = True) -> list[str]:
        """One `optima: warning:` line per plugin that failed to load, is
        malformed (unless `malformed` is False) or adds nothing; the first two
        kinds are skipped and the rest goes on."""
        lines = [f"plugin {name!r} failed to load and is skipped: {error}" for name, error in self.failures.items()]
        lines += self.errors if malformed else []
        return [warning(line) for line in lines + self.warnings]

    def of_kind(self, kind: str) -> list[Component]:
        return [c for c in self.components.values() if c.kind == kind]

    def of_plugin(self, plugin: str) -> list[Component]:
        return [c for c in self.components.values() if c.plugin == plugin]

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.manager.list_name_plugin()]


class _Manager(pluggy.PluginManager):
    """Also picks up unmarked functions named `optima_register_*`, so that a
    forgotten `@hookimpl` works and an unmarked misspelling is caught."""

    def parse_hookimpl_opts(self, plugin, name: str):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith(_UNMARKED_PREFIX):
            try:
                candidate = inspect.getattr_static(plugin, name)
            except AttributeError:
                return None
            if inspect.isfunction(candidate):
                return {"wrapper": False, "hookwrapper": False, "optionalhook": False,
                        "tryfirst": False, "trylast": False, "specname": None}
        return opts


def disabled_plugins() -> set[str] | bool:
    """`OPTIMA_DISABLE_PLUGINS`: True for all external plugins ("1", "true", "all"),
    else the set of entry-point names it lists (empty when unset or "0")."""
    value = os.environ.get(DISABLE_VARIABLE, "").strip()
    if value.lower() in ("", "0", "false", "no"):
        return set()
    if value.lower() in ("1", "true", "yes", "all"):
        return True
    return {name.strip() for name in value.split(",") if name.strip()}


def plugins_disabled() -> bool:
    """Whether `OPTIMA_DISABLE_PLUGINS` turns off every external plugin."""
    return disabled_plugins() is True


def load(external: bool | None = None, *, strict: bool = True,
         plugins: Iterable[tuple[str, Any]] = ()) -> Registry:
    """Load the built-in plugin, then (unless `external` is False or
    `OPTIMA_DISABLE_PLUGINS` says so) the `optima` entry points, then `plugins`
    (`(name, module)` pairs, e.g. a plugin under test); collect their components.

    Raises `PluginError` for a malformed plugin; with `strict=False` records it
    in `Registry.errors` and skips it instead.
    """
    # by its name, as entry points are: the plugins are a floor above this package
    builtin = importlib.import_module(BUILTIN_MODULE)

    disabled = disabled_plugins()
    if external is None:
        external = disabled is not True
    skipped = disabled if isinstance(disabled, set) else set()
    pm = _Manager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm, external=external)
    loader = _Loader(registry, strict)
    dist_version = _version(DISTRIBUTION)
    loader.add(builtin, PluginInfo(BUILTIN, builtin.__name__, DISTRIBUTION if dist_version else None,
                                   dist_version, builtin=True))
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, ep.value, dist.name if dist else None, dist.version if dist else None)
        if not external or ep.name in skipped:
            info.status = "disabled"
            registry.plugins.setdefault(ep.name, info)
            continue
        if ep.name in registry.plugins:
            loader.invalid(info, f"plugin name {ep.name!r} is taken by both {_origin(registry.plugins[ep.name])} "
                                 f"and {_origin(info)}; uninstall one of them", record=False)
            continue
        try:
            plugin = ep.load()
        except (Exception, SystemExit) as e:  # a broken plugin must not break the rest
            loader.fail(info, _one_line(e))
            continue
        loader.add(plugin, info)
    for name, plugin in plugins:
        loader.add(plugin, PluginInfo(name, getattr(plugin, "__name__", repr(plugin))))
    pm.check_pending()  # unknown hooks were caught per plugin above; this is a safety net
    loader.collect()
    return registry


class _Loader:
    def __init__(self, registry: Registry, strict: bool):
        self.registry, self.strict = registry, strict
        self.objects: dict[str, Any] = {}

    def fail(self, info: PluginInfo, error: str) -> None:
        info.status, info.error = "failed", error
        self.registry.plugins[info.name] = info
        self._drop(info)

    def invalid(self, info: PluginInfo, message: str, record: bool = True) -> None:
        if self.strict:
            if not info.builtin:
                message += f" (to run without it: {DISABLE_VARIABLE}={info.name})"
            raise PluginError(message)
        message += f"; {_origin(info)} is skipped"
        if not info.builtin:
            message += f" ({DISABLE_VARIABLE}={info.name} turns it off)"
        info.status, info.error = "invalid", message
        if record:
            self.registry.plugins[info.name] = info
        self.registry.errors.append(message)
        self._drop(info)

    def _drop(self, info: PluginInfo) -> None:
        plugin = self.objects.pop(info.name, None)
        if plugin is not None and self.registry.manager.is_registered(plugin):
            self.registry.manager.unregister(plugin)

    def add(self, plugin: Any, info: PluginInfo) -> None:
        pm = self.registry.manager
        taken = self.registry.plugins.get(info.name)
        if taken is not None and taken.status == "disabled" and info.name not in self.objects:
            # an entry point that was not loaded (plugins disabled) takes no name: a plugin
            # given by module (tests, an example imported from source) may use it
            del self.registry.plugins[info.name]
        if info.name in self.registry.plugins:
            return self.invalid(info, f"plugin name {info.name!r} is taken by both "
                                      f"{_origin(self.registry.plugins[info.name])} and {_origin(info)}",
                                record=False)
        try:
            pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as e:  # an implementation whose arguments do not fit its spec
            self.registry.plugins[info.name] = info
            return self.invalid(info, f"plugin {info.name!r}: {e}")
        except ValueError as e:  # the same module under two names
            self.registry.plugins[info.name] = info
            return self.invalid(info, f"plugin {info.name!r} ({info.module}): {e}")
        self.registry.plugins[info.name] = info
        self.objects[info.name] = plugin
        callers = pm.get_hookcallers(plugin) or []
        unknown = sorted({hc.name for hc in callers if not hc.has_spec() and
                          any(not i.optionalhook for i in hc.get_hookimpls() if i.plugin is plugin)})
        if unknown:
            hints = []
            for name in unknown:
                near = difflib.get_close_matches(name, list(HOOKS.values()), n=1, cutoff=0.6)
                hints.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
            return self.invalid(info, f"plugin {info.name!r} ({info.module}) implements unknown hook(s) "
                                      f"{', '.join(hints)}; valid hooks: {', '.join(HOOKS.values())}")
        names = {hc.name for hc in callers}
        info.hooks = tuple(h for h in HOOKS.values() if h in names)
        if not info.hooks:
            self.registry.warnings.append(_no_hooks(plugin, info))

    def collect(self) -> None:
        """Call each loaded plugin's hooks, then merge its components (a plugin's
        components enter all together or not at all)."""
        pm = self.registry.manager
        for name, plugin in list(self.objects.items()):
            info = self.registry.plugins[name]
            found: list[Component] = []
            try:
                for kind, hook_name in HOOKS.items():
                    for impl in getattr(pm.hook, hook_name).get_hookimpls():
                        if impl.plugin is plugin:
                            kwargs = {"register": _registrar(found, kind, name)}
                            impl.function(**{a: kwargs[a] for a in impl.argnames})
            except PluginError as e:
                self.invalid(info, str(e))
                continue
            except Exception as e:  # a broken plugin must not break the rest
                self.fail(info, f"{hook_name}: {_one_line(e)}")
                continue
            clash = next((c for c in found if c.gin_name in self.registry.components), None)
            if clash is not None:
                previous = self.registry.components[clash.gin_name]
                self.invalid(info, f"{clash.kind} {clash.name!r} ({clash.gin_name}) is registered by both "
                                   f"{_origin(self.registry.plugins[previous.plugin])} and {_origin(info)}; "
                                   f"uninstall or rename one of them")
                continue
            for component in found:
                self.registry.components[component.gin_name] = component


def _registrar(found: list[Component], kind: str, plugin: str):
    def register(name: str, factory: Callable, *, modules: Sequence[str] | None = None) -> None:
        if not isinstance(name, str) or not _IDENTIFIER.match(name):
            raise PluginError(f"plugin {plugin!r}: {kind} name {name!r} is not a Python identifier "
                              f"(gin could not refer to it)")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r}: the factory of {kind} {name!r} is not callable: {factory!r}")
        if modules is not None:
            if kind != "model":
                raise PluginError(f"plugin {plugin!r}: modules= only applies to models, not to {kind} {name!r}")
            if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
                raise PluginError(f"plugin {plugin!r}: model {name!r} modules must be a list of names")
            modules = tuple(modules)
        component = Component(kind, name, factory, plugin, modules)
        if any(c.gin_name == component.gin_name for c in found):
            raise PluginError(f"plugin {plugin!r} registers {kind} {name!r} twice")
        found.append(component)
    return register


def _no_hooks(plugin: Any, info: PluginInfo) -> str:
    """The warning for a plugin that implements no hook, with the function names
    that look like misspelled hooks."""
    near = []
    for name in sorted(dir(plugin)):
        match = difflib.get_close_matches(name, list(HOOKS.values()), n=1, cutoff=0.75)
        if match and callable(getattr(plugin, name, None)):
            near.append(f"{name!r} (did you mean {match[0]!r}?)")
    found = f"; {', '.join(near)}" if near else ""
    return (f"plugin {info.name!r} ({info.module}) implements no hook, so it adds nothing{found}; hooks are "
            f"functions named {', '.join(HOOKS.values())}")


def _origin(info: PluginInfo) -> str:
    """`'name' (distribution version)` or `'name' (module)`."""
    if info.distribution:
        return f"{info.name!r} ({info.distribution} {info.version or ''})".replace(" )", ")")
    return f"{info.name!r} ({info.module})"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _one_line(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}".replace("\n", " ")
