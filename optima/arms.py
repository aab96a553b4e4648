"""The arms of the bandit: subsets of a model's modules, or of layer groups inside them.

By default an arm's atoms (its *units*) are whole modules, as in the paper.
`distillation.arm_groups` splits modules into consecutive layer groups (the
paper's future work): with `arm_groups = 2`, CoCa's 2-layer image module
becomes the units `image.1` (its first layer) and `image.2` (its second), and
an arm is any non-empty set of units.
"""
from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

from optima.errors import ConfigError

#: More units than this make `2^units - 1` default arms too many to enumerate.
MAX_DEFAULT_UNITS = 16


def layer_groups(module_layers: Mapping[str, int], groups: Any = 1) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Units over `module_layers` (module name -> layer count): unit name ->
    (module, its layer indices, 0-based).

    `groups`: 1 (whole modules; units are the module names), an integer `g`
    (every module split into `g` consecutive groups, sizes as equal as they go,
    the larger ones first; units `<module>.1` .. `<module>.g`), or a mapping
    module -> an integer (that module in so many groups; modules left out stay
    whole) or a list of group sizes summing to the module's layers (e.g.
    `{'image': [1, 3]}`). A module in one group keeps its name as unit name.
    """
    if isinstance(groups, Mapping):
        unknown = [m for m in groups if m not in module_layers]
        if unknown:
            raise ConfigError(f"names unknown module(s) {unknown}; valid modules: {', '.join(module_layers)}")
        per_module = {m: groups.get(m, 1) for m in module_layers}
    else:
        per_module = {m: groups for m in module_layers}
    units: dict[str, tuple[str, tuple[int, ...]]] = {}
    for module, n_layers in module_layers.items():
        spec = per_module[module]
        if isinstance(spec, bool) or not (isinstance(spec, int) or isinstance(spec, (list, tuple))):
            raise ConfigError(f"module {module!r}: a number of groups or a list of group sizes, got {spec!r}")
        if isinstance(spec, int):
            if not 1 <= spec <= n_layers:
                raise ConfigError(f"module {module!r} has {n_layers} layer(s): it can be split into 1 to "
                                  f"{n_layers} groups, not {spec}")
            sizes = [n_layers // spec + (1 if i < n_layers % spec else 0) for i in range(spec)]
        else:
            sizes = list(spec)
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes) or sum(sizes) != n_layers:
                raise ConfigError(f"module {module!r}: group sizes {sizes} must be integers >= 1 summing to its "
                                  f"{n_layers} layer(s)")
        start = 0
        for i, size in enumerate(sizes):
            name = module if len(sizes) == 1 else f"{module}.{i + 1}"
            units[name] = (module, tuple(range(start, start + size)))
            start += size
    return units


class ArmSpace:
    """Arms over modules `names`. By default every non-empty subset of the units
    (`2^U - 1`), ordered by size then by unit order; or an explicit list of subsets.
    Units are the modules, or the layer groups of `units` (`layer_groups`).
    `empty=True` adds, last, the empty arm `()` (label `none`): a round of the task
    and output KD without layer losses (`distillation.empty_arm`).

    >>> ArmSpace(["image", "text"]).labels()
    ['image', 'text', 'image+text']
    """

    def __init__(self, names: Sequence[str], subsets: Iterable[Iterable[str]] | None = None,
                 units: Mapping[str, tuple[str, tuple[int, ...]]] | None = None, empty: bool = False):
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ConfigError(f"module names must be unique and non-empty, got {list(self.names)}")
        #: unit name -> (module, layer indices or None for all of the module's layers)
        self.units: dict[str, tuple[str, tuple[int, ...] | None]] = \
            {m: (m, None) for m in self.names} if units is None else dict(units)
        unit_names = tuple(self.units)
        if subsets is None:
            if len(unit_names) > MAX_DEFAULT_UNITS:
                raise ConfigError(f"{len(unit_names)} units make {2 ** len(unit_names) - 1} arms; list the arms "
                                  f"(distillation.arms) or use fewer groups")
            subsets = [c for k in range(1, len(unit_names) + 1) for c in itertools.combinations(unit_names, k)]
        arms: list[tuple[str, ...]] = []
        for subset in subsets:
            subset = [subset] if isinstance(subset, str) else list(subset)
            unknown = [u for u in subset if u not in self.units]
            if unknown:
                what = "module(s)" if units is None else "unit(s)"
                raise ConfigError(f"arm {subset} names unknown {what} {unknown}; valid {what[:-3]}s: "
                                  f"{', '.join(unit_names)}")
            if not subset:
                raise ConfigError("an arm must contain at least one module (for rounds without layer losses "
                                  "bind distillation.empty_arm = True)")
            arm = tuple(u for u in unit_names if u in subset)  # canonical order
            if arm in arms:
                raise ConfigError(f"arm {list(arm)} is listed twice")
            arms.append(arm)
        if not arms:
            raise ConfigError("no arm is listed; list at least one (a list of module names), or leave it unbound "
                              "for every non-empty subset of the modules")
        if empty:
            arms.append(())
        self.arms: tuple[tuple[str, ...], ...] = tuple(arms)

    @classmethod
    def of_model(cls, model, subsets: Iterable[Iterable[str]] | None = None, groups: Any = 1,
                 empty: bool = False) -> "ArmSpace":
        """The arms over a `DistillableModel`'s modules, split by `groups` (`layer_groups`)."""
        modules = model.distill_modules()
        names = [m.name for m in modules]
        if groups == 1:
            return cls(names, subsets, empty=empty)
        return cls(names, subsets, layer_groups({m.name: len(m) for m in modules}, groups), empty=empty)

    def __len__(self) -> int:
        return len(self.arms)

    def __getitem__(self, k: int) -> tuple[str, ...]:
        """The units of arm `k` (module names, or groups such as `image.1`)."""
        return self.arms[k]

    def label(self, k: int) -> str:
        return "+".join(self.arms[k]) or "none"

    def labels(self) -> list[str]:
        return [self.label(k) for k in range(len(self))]

    def index(self, modules: Iterable[str]) -> int:
        wanted = tuple(u for u in self.units if u in set(modules))
        try:
            return self.arms.index(wanted)
        except ValueError:
            raise ConfigError(f"{list(modules)} is not an arm; arms: {', '.join(self.labels())}") from None

    @property
    def grouped(self) -> bool:
        """Whether some unit is a layer group rather than a whole module."""
        return any(layers is not None for _, layers in self.units.values())

    def modules_of(self, k: int) -> tuple[str, ...]:
        """The modules arm `k` distils some layers of, in module order."""
        touched = {self.units[u][0] for u in self.arms[k]}
        return tuple(m for m in self.names if m in touched)

    def layers(self, k: int, keys: Iterable[tuple[str, int]]) -> frozenset[tuple[str, int]]:
        """The `(module, layer index)` keys among `keys` (e.g. a recorder's) that
        arm `k` distils."""
        wanted = [self.units[u] for u in self.arms[k]]
        return frozenset(key for key in keys
                         if any(key[0] == m and (idx is None or key[1] in idx) for m, idx in wanted))

    def features(self) -> list[list[float]]:
        """(arms, units) 0/1: whether arm `k` contains unit `u` (what a policy
        that shares information between arms, e.g. `grouped_ts_policy`, reads)."""
        return [[1.0 if u in arm else 0.0 for u in self.units] for arm in self.arms]

    def describe_units(self) -> dict[str, str]:
        """unit -> "module layers 0-1" (for the dry run)."""
        out = {}
        for unit, (module, idx) in self.units.items():
            out[unit] = f"{module} (all layers)" if idx is None else \
                f"{module} layer{'s' if len(idx) > 1 else ''} {idx[0]}" + (f"-{idx[-1]}" if len(idx) > 1 else "")
        return out


def build_policy(factory: Callable, num_arms: int, seed: int, features: Any = None, horizon: int | None = None):
    """`factory(num_arms=, seed=)`; with `features` ((arms, units) 0/1, see
    `ArmSpace.features`), also `arm_features=` (a float64 tensor) when the
    factory takes that parameter: how a policy learns which arms share units.
    With `horizon` (the number of rounds, when the run knows it), also
    `horizon=` when the factory takes that parameter (policies written before
    it existed are called as before): what a policy derives its windows and
    discounts from."""
    kwargs: dict[str, Any] = {"num_arms": num_arms, "seed": seed}
    if features is not None and _takes(factory, "arm_features"):
        import torch

        kwargs["arm_features"] = torch.as_tensor(features, dtype=torch.float64, device="cpu")
    if horizon is not None and _takes(factory, "horizon"):
        kwargs["horizon"] = int(horizon)
    return factory(**kwargs)


def _takes(factory: Callable, parameter: str) -> bool:
    """Whether `factory` (a function or class, possibly wrapped by gin) declares
    `parameter`. gin wraps a configurable class in a subclass whose `__init__` takes
    `*args, **kwargs`, and a scoped reference in a function: look through both."""
    target = inspect.unwrap(factory)
    inits = [vars(k)["__init__"] for k in target.__mro__ if "__init__" in vars(k)] if isinstance(target, type) \
        else [target]
    for fn in inits:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no signature to read
            continue
        if parameter in params:
            return True
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
            return False  # an explicit signature without it
    return False
