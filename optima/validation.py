"""Checks of a parsed configuration before any heavy work.

`check_component_bindings` runs on the parsed config before gin calls anything
(rewards bound called, the other components uncalled). `validate_experiment`
runs first in `optima.experiment.experiment` (so `optima run` checks a config
before it makes a run directory or trains anything). It builds the task (which
checks its values) and checks that its data files are there and not empty; it
reads the bindings of the experiment, of the teacher stage and of every
distillation stage (in the stage's scope), builds the models on the meta device
(shapes only: nothing allocated, loaded or fetched) to learn their modules, and
builds each stage's arm space, policy, loss and optimizer as the stage will.
Every problem is a `ConfigError` of one line naming the binding, with its scope
when it has one, and what it allows, e.g.

    optima_policy.warmup_rounds = 3 must be an integer >= the number of arms (7)
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import gin
import torch

from optima.align import pair_layouts
from optima.arms import ArmSpace, build_policy, layer_groups
from optima.checkpoint import encode
from optima.engine import NONFINITE_ACTIONS
from optima.errors import ConfigError
from optima.stages import TEACHER

Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def integer(minimum: int, maximum: int | None = None) -> tuple[Check, str]:
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    return (lambda v: _is_int(v) and v >= minimum and (maximum is None or v <= maximum)), allowed


def number(low: float, *, strict: bool = False, high: float | None = None, optional: bool = False) -> tuple[Check, str]:
    def ok(v):
        if v is None:
            return optional
        return _is_number(v) and (v > low if strict else v >= low) and (high is None or v <= high)

    if high is None:
        allowed = f"a number {'>' if strict else '>='} {low:g}"
    else:
        allowed = f"a number in {'(' if strict else '['}{low:g}, {high:g}]"
    return ok, allowed + (" (or None)" if optional else "")


def one_of(*choices: Any) -> tuple[Check, str]:
    return (lambda v: v in choices), "one of " + ", ".join(map(repr, choices))


BOOLEAN = ((lambda v: isinstance(v, bool)), "True or False")
#: torch.compile: off, on (inductor), or a backend's name
COMPILE = ((lambda v: isinstance(v, (bool, str)) and v != ""), "True, False or a torch.compile backend name")

#: Parameters of the core stages and what they allow.
STAGE_PARAMS: dict[str, dict[str, tuple[Check, str]]] = {
    "teacher_training": {
        "steps": integer(0), "batch_size": integer(1), "warmup_steps": integer(0),
        "grad_clip": number(0, optional=True), "head_lr": number(0, strict=True, optional=True),
        "checkpoint_every": integer(1), "keep_checkpoints": integer(1), "on_nonfinite": one_of(*NONFINITE_ACTIONS),
        "amp": BOOLEAN, "compile": COMPILE,
    },
    "pretraining": {
        "steps": integer(1), "batch_size": integer(1), "warmup_steps": integer(0), "seed": integer(0),
        "grad_clip": number(0, optional=True), "checkpoint_every": integer(1), "keep_checkpoints": integer(1),
        "on_nonfinite": one_of(*NONFINITE_ACTIONS), "amp": BOOLEAN, "compile": COMPILE,
    },
    "distillation": {
        "rounds": integer(1), "steps_per_round": integer(1), "batch_size": integer(1), "warmup_steps": integer(0),
        "grad_clip": number(0, optional=True), "head_lr": number(0, strict=True, optional=True),
        "checkpoint_every": integer(1), "keep_checkpoints": integer(1), "on_nonfinite": one_of(*NONFINITE_ACTIONS),
        "amp": BOOLEAN, "compile": COMPILE, "empty_arm": BOOLEAN, "alignment_gate": BOOLEAN,
        "gate_halflife": number(0),
    },
}
def number_or_auto() -> tuple[Check, str]:
    ok, _ = number(0, strict=True)
    return (lambda v: v == "auto" or ok(v)), "'auto' or a number > 0"


#: Parameters any policy or loss may have, by name, and what they allow (a
#: policy's constructor checks the rest, e.g. a range that depends on the policy).
POLICY_PARAMS = {"gamma": number(0, strict=True, high=1), "variance_scale": number_or_auto(),
                 "scale": number_or_auto(), "reward_scale": number_or_auto(), "prior_weight": number_or_auto(),
                 "entropy_window": integer(1), "window": integer(1), "epsilon": number(0, high=1),
                 "step_size": number(0, strict=True, high=1), "share": number(0, high=1),
                 "horizon": integer(1)}  # `warmup`: each policy names the orders it takes
LOSS_PARAMS = {"temperature": number(0, strict=True), "hidden_norm": one_of("none", "teacher_var")}
WEIGHT = number(0)  # any loss parameter named `*_weight`
LEARNING_RATE = number(0, strict=True)  # an optimizer's `lr`


def _check(name: str, value: Any, spec: tuple[Check, str]) -> None:
    ok, allowed = spec
    if not ok(value):
        raise ConfigError(f"{name} = {value!r} must be {allowed}")


def check_value(name: str, value: Any, spec: tuple[Check, str]) -> None:
    """A `ConfigError` naming binding `name` unless `value` passes `spec` (e.g. `integer(1)`)."""
    _check(name, value, spec)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def bound(selector: str, scopes: Sequence[str] = (), resolve: bool = True) -> dict[str, tuple[str, Any]]:
    """The parameters bound for `selector` when called in `scopes`:
    `param -> (binding as written, e.g. 'student/distillation.rounds', value)`."""
    out: dict[str, tuple[str, Any]] = {}
    previous: dict[str, Any] = {}
    for depth in range(len(scopes) + 1):
        level = list(scopes[:depth])
        with gin.config_scope(level):
            try:
                current = gin.get_bindings(selector, resolve_references=resolve)
            except (ValueError, KeyError):
                current = {}
        for param, value in current.items():
            if param not in previous or not _same(previous[param], value):
                out[param] = ("/".join([*level, selector]) + f".{param}", value)
        previous = current
    return out


def _check_params(values: Mapping[str, tuple[str, Any]], params: Mapping[str, tuple[Check, str]]) -> None:
    for param, spec in params.items():
        if param in values:
            _check(*values[param], spec)


def _reference(selector: str, param: str, scopes: Sequence[str]):
    """The unresolved `@reference` bound to `selector.param` in `scopes`, or None."""
    ref = bound(selector, scopes, resolve=False).get(param, (None, None))[1]
    return ref if isinstance(ref, gin.config.ConfigurableReference) else None


def _ref_name(ref, scopes: Sequence[str]) -> tuple[str, list[str]]:
    """(`scope/selector` as a user would bind its parameters, the scopes it runs in).
    gin calls a scoped reference (`@student/torch.optim.AdamW`) in its own scope,
    which replaces the caller's (a stage `tiny6` reads `student/...` bindings);
    an unscoped one runs in the caller's scopes."""
    run_scopes = list(ref.scopes) if ref.scopes else list(scopes)
    return ref.scoped_selector, run_scopes


def _check_optimizer(selector: str, scopes: Sequence[str], optimizer: Callable | None) -> None:
    ref = _reference(selector, "optimizer", scopes)
    if optimizer is None or ref is None:
        return
    name, run_scopes = _ref_name(ref, scopes)
    if "lr" in (values := bound(ref.selector, run_scopes)):
        _check(*values["lr"], LEARNING_RATE)  # torch accepts 0, which trains nothing
    with gin.config_scope(list(scopes)):
        try:
            optimizer([torch.nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{name}: {str(e).splitlines()[0]}") from None


# -- components bound called or uncalled ---------------------------------------------

#: Rewards are bound called (`@kd_reward()`: gin builds one from its bindings);
#: the other kinds uncalled (`@optima_policy`): the engine calls them with what it
#: supplies. A component's gin name ends with its kind (`<name>_<kind>`).
CALLED = ("reward",)
SUPPLIED = {"model": "builds each model in its stage's scope", "task": "builds the task once per run",
            "head": "builds a head over each model and the task",
            "policy": "builds a policy with the number of arms and a seed",
            "loss": "builds a loss over the student's and teacher's modules",
            "optimizer": "builds an optimizer over the parameters to train"}
#: The core stages' component parameters and the kind each takes.
COMPONENT_PARAMS = {
    ("experiment", "task"): "task", ("experiment", "teacher"): "model", ("experiment", "head"): "head",
    ("experiment", "student"): "model", ("experiment", "students"): "model",
    ("teacher_training", "optimizer"): "optimizer",
    ("distillation", "policy"): "policy", ("distillation", "reward"): "reward", ("distillation", "loss"): "loss",
    ("distillation", "optimizer"): "optimizer",
}


def _kind(ref) -> str | None:
    """The component kind a reference names (`kd_reward` -> reward; torch.optim.* -> optimizer)."""
    if ref.selector.startswith("torch.optim."):
        return "optimizer"
    kind = ref.selector.rsplit(".", 1)[-1].rsplit("_", 1)[-1]
    return kind if kind in (*CALLED, *SUPPLIED) else None


def _references(value: Any) -> list:
    """The `@references` in a bound value (also inside dicts, lists, tuples); macros are not references."""
    if isinstance(value, gin.config.ConfigurableReference):
        return [] if value.selector == "gin.macro" else [value]
    if isinstance(value, Mapping):
        return [r for v in value.values() for r in _references(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _references(v)]
    return []


def _written(ref, called: bool) -> str:
    return f"@{ref.scoped_selector}" + ("()" if called else "")


def check_component_bindings() -> None:
    """Every binding that names a component: the core stages' component
    parameters name a component of their kind, rewards are bound called and
    every other kind uncalled (README, "Running experiments"). Reads the parsed
    config only (nothing is built), so it runs before gin calls anything: a
    wrong call would otherwise fail late or as a TypeError."""
    for (scope, selector), params in gin.config._CONFIG.items():
        name = selector if selector.startswith("torch.optim.") else selector.rsplit(".", 1)[-1]
        for param, value in params.items():
            binding = f"{scope}/{name}.{param}" if scope else f"{name}.{param}"
            wanted = COMPONENT_PARAMS.get((name, param))
            refs = _references(value)
            if wanted is not None and value is not None and not refs:
                raise ConfigError(f"{binding} = {value!r} must name a {wanted}, e.g. "
                                  f"@<name>_{wanted}{'()' if wanted in CALLED else ''}")
            for ref in refs:
                kind = _kind(ref)
                if wanted is not None and kind != wanted and not (wanted == "optimizer" and kind is None):
                    raise ConfigError(f"{binding} = {_written(ref, ref.evaluate)} must name a {wanted} "
                                      f"(@<name>_{wanted}{'()' if wanted in CALLED else ''}); "
                                      f"{ref.selector} is {'a ' + kind if kind else 'not one'}")
                if kind in CALLED and not ref.evaluate:
                    raise ConfigError(f"{binding} = {_written(ref, False)}: bind it called, {_written(ref, True)}: "
                                      f"a {kind} is built once, from its bindings")
                if kind in SUPPLIED and ref.evaluate:
                    raise ConfigError(f"{binding} = {_written(ref, True)}: bind it uncalled, "
                                      f"{_written(ref, False)}: the engine {SUPPLIED[kind]}")


def _check_device(device: Any, available: bool) -> None:
    allowed = "'auto', 'cpu', 'cuda' or 'cuda:<index>' (a torch device)"
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"experiment.device = {device!r} must be {allowed}") from None
    if available and dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"experiment.device = {device!r}, but no CUDA device is available; use 'auto' or 'cpu'")


def validate_experiment(*, task: Callable, teacher: Callable, stages: Mapping[str, Callable], seed: Any,
                        device: Any, eval_batch_size: Any, data_workers: Any = None,
                        device_present: bool = True, pretraining: Sequence[str] = ()) -> None:
    """Raise `ConfigError` for the first binding out of its range (see module doc).
    `device_present`: also require the device and the data to exist here (not for
    a dry run, which lists what is missing)."""
    check_component_bindings()
    _check("experiment.seed", seed, integer(0, 2**63 - 1))
    _check("experiment.eval_batch_size", eval_batch_size, integer(1))
    if data_workers is not None:
        _check("experiment.data_workers", data_workers, integer(0))
    _check_device(device, device_present)
    for name in stages:
        if not isinstance(name, str) or not gin.config.config_parser.MODULE_RE.match(name):
            raise ConfigError(f"experiment.students key {name!r} must be a name usable as a gin scope "
                              "(letters, digits, _ and .)")

    try:  # the task checks its own bindings (sizes, paths, patterns) when built
        the_task = task()
    except (ValueError, TypeError) as e:  # a plugin's own check, or a value of the wrong type
        ref = _reference("experiment", "task", ())
        raise ConfigError(f"{ref.selector.rsplit('.', 1)[-1] if ref else 'experiment.task'}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if device_present:
        the_task.check_data(("train", "test"))  # the splits every run reads

    for name in pretraining:
        if not isinstance(name, str) or not gin.config.config_parser.MODULE_RE.match(name):
            raise ConfigError(f"experiment.pretraining key {name!r} must be a name usable as a gin scope "
                              "(letters, digits, _ and .)")
        values = bound("pretraining", [name])
        _check_params(values, STAGE_PARAMS["pretraining"])
        for binding, weights in [values["term_weights"]] if "term_weights" in values else []:
            if weights is not None and (not isinstance(weights, Mapping)
                                        or not all(_is_number(w) and w >= 0 for w in weights.values())):
                raise ConfigError(f"{binding} = {weights!r} must be a dict of term name -> number >= 0")
        _check_optimizer("pretraining", [name], values.get("optimizer", (None, None))[1])

    teacher_values = bound("teacher_training", [TEACHER])
    _check_params(teacher_values, STAGE_PARAMS["teacher_training"])
    _check_optimizer("teacher_training", [TEACHER], teacher_values.get("optimizer", (None, None))[1])

    with torch.device("meta"):
        with gin.config_scope(TEACHER):
            upstream = teacher()
        for name, factory in stages.items():
            with gin.config_scope(name):
                student = factory()
            _validate_stage(name, student, upstream, seed)
            upstream = student


def _naming(component: str, e: ConfigError) -> ConfigError:
    """A component's own error, naming it once: prefixed only if it does not already."""
    message = str(e).splitlines()[0]
    return ConfigError(message if component in message else f"{component}: {message}")


def check_policy(ref, scopes: Sequence[str], num_arms: int, build: Callable[[], Any]) -> None:
    """The bindings of the policy `ref` (a gin reference, called in `scopes`) over
    `num_arms` arms, then `build()` it: a `ConfigError` from its constructor
    ("window = 3 must be ...") is named after the policy ("sw_ucb_policy.window = 3 must be ...");
    its `state_dict()` must be something a checkpoint can hold."""
    policy_name, run_scopes = _ref_name(ref, scopes)
    policy_values = bound(ref.selector, run_scopes)
    _check_params(policy_values, POLICY_PARAMS)
    if "arm" in policy_values:
        _check(*policy_values["arm"], integer(-num_arms, num_arms - 1))
    # a policy lives on the CPU, also while the models are checked on the meta device
    with gin.config_scope(list(scopes)), torch.device("cpu"):
        try:
            policy = build()
        except ConfigError as e:
            message = str(e).splitlines()[0]
            if any(message.startswith(f"{param} = ") for param in policy_values):  # "window = 3 must be ..."
                raise ConfigError(f"{policy_name}.{message}") from None
            raise _naming(policy_name, e) from None
    try:  # checkpoints keep it: found now, not at the first checkpoint hours in
        encode(policy.state_dict(), {})
    except TypeError as e:
        raise ConfigError(f"{policy_name}.state_dict(): {e}; a policy's state holds nested dicts, lists and "
                          "tuples of tensors, numpy arrays, numbers, strings, bools and None") from None


def _validate_stage(name: str, student, teacher, seed: int) -> None:
    scopes = [name]
    values = bound("distillation", scopes)
    _check_params(values, STAGE_PARAMS["distillation"])
    arms_binding, arms = values.get("arms", ("distillation.arms", None))
    groups_binding, groups = values.get("arm_groups", ("distillation.arm_groups", 1))
    try:
        units = layer_groups({m.name: len(m) for m in student.distill_modules()}, groups)
    except ConfigError as e:
        raise ConfigError(f"{groups_binding} = {groups!r}: {e}") from None
    try:
        arm_space = ArmSpace(student.module_names(), arms, None if groups == 1 else units,
                             empty=values.get("empty_arm", (None, False))[1] is True)
    except ConfigError as e:
        raise ConfigError(f"{arms_binding} = {arms!r}: {e}") from None
    if tuple(teacher.module_names()) != arm_space.names:
        raise ConfigError(f"stage {name}: the teacher's modules {list(teacher.module_names())} differ from the "
                          f"student's {list(arm_space.names)}")

    ref = _reference("distillation", "policy", scopes)
    if ref is not None and "policy" in values:
        rounds = values.get("rounds", (None, None))[1]
        horizon = rounds if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1 else None
        check_policy(ref, scopes, len(arm_space),
                     lambda: build_policy(values["policy"][1], len(arm_space), seed, arm_space.features(), horizon))

    ref = _reference("distillation", "loss", scopes)
    if ref is not None and "loss" in values:
        loss_name, run_scopes = _ref_name(ref, scopes)
        loss_values = bound(ref.selector, run_scopes)
        _check_params(loss_values, LOSS_PARAMS)
        for param, (binding, value) in loss_values.items():
            if param.endswith("_weight"):
                _check(binding, value, WEIGHT)
        with gin.config_scope(scopes):
            try:
                values["loss"][1](student.distill_modules(), teacher.distill_modules(), **pair_layouts(student, teacher))
            except ConfigError as e:
                raise _naming(loss_name, e) from None

    _check_optimizer("distillation", scopes, values.get("optimizer", (None, None))[1])
