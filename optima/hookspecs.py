"""Hook specifications: the only way components enter OPTIMA.

A plugin is a module (or any object) whose functions are named after these
hooks; `optima.registry` loads the built-in plugin first, then the `optima`
entry-point group, and checks every implementation against a specification here
(a misspelled hook is an error naming it). `docs/plugins.md` shows each hook
with a runnable example.

All hooks work the same way:

- Receives: `register(name, factory, **info)`; call it once per component.
  `name` is a Python identifier (`"coca"`, `"optima"`); the component becomes
  the gin configurable `<name>_<kind>` (`coca_model`, `optima_policy`).
  `factory` is a function or class whose keyword arguments are the gin-bindable
  parameters; its docstring's first line describes it in `optima plugins`.
- Returns: nothing; a return value is ignored.
- Every implementation is called, built-ins first, then plugins in entry-point
  name order: no hook is first-result-wins. Registering a name twice for one
  kind is an error that names both plugins; an implementation that raises makes
  its plugin skipped as a whole (reported with the error), the rest goes on.

A function is an implementation if it is marked `@hookimpl`, or, unmarked, if
its name starts with `optima_register_`.
"""
import pluggy

hookspec = pluggy.HookspecMarker("optima")
hookimpl = pluggy.HookimplMarker("optima")


@hookspec
def optima_register_models(register):
    """Models: a modality is a model with one more module.

    Receives `register(name, factory, modules=None)`: `factory(**bindings)`
    returns an `optima.interfaces.DistillableModel`; `modules` names the modules
    its `distill_modules()` returns, in order (listed by `optima plugins`; the
    arms are every non-empty subset of them). Bound uncalled in a gin scope:
    `experiment.teacher = @teacher/coca_model`.
    Returns nothing; every implementation is called (not first-result-wins).
    """


@hookspec
def optima_register_tasks(register):
    """Tasks: data splits, task loss and metric.

    Receives `register(name, factory)`: `factory(**bindings)` returns an
    `optima.interfaces.Task` that also has `fingerprint()` (a JSON-able dict:
    equal fingerprints give equal data; it keys the teacher and student caches).
    Bound uncalled: `experiment.task = @synthetic_ve_task`.
    Returns nothing; every implementation is called (not first-result-wins).
    """


@hookspec
def optima_register_heads(register):
    """Task heads over a model's features.

    Receives `register(name, factory)`: `factory(model, task, **bindings)`
    returns an `optima.interfaces.Head`, given the `DistillableModel` it sits on
    and the `Task`. Bound uncalled: `experiment.head = @attentional_pooler_head`.
    Returns nothing; every implementation is called (not first-result-wins).
    """


@hookspec
def optima_register_policies(register):
    """Bandit policies that pick the arm (subset of modules) of each round.

    Receives `register(name, factory)`: `factory(num_arms, seed, **bindings)`
    returns an `optima.interfaces.Policy`; the engine passes `num_arms` and
    `seed`. Bound uncalled: `distillation.policy = @optima_policy`.
    Returns nothing; every implementation is called (not first-result-wins).
    """


@hookspec
def optima_register_rewards(register):
    """Rewards: a round's losses against the previous round's -> [0, 1].

    Receives `register(name, factory)`: `factory(**bindings)` returns an
    `optima.interfaces.Reward`, called with two `optima.interfaces.RoundLosses`
    (whole-model totals, per-module sums, the played arm). Bound called:
    `distillation.reward = @kd_reward()`.
    Returns nothing; every implementation is called (not first-result-wins).
    """


@hookspec
def optima_register_losses(register):
    """Distillation objectives.

    Receives `register(name, factory)`: `factory(student_modules,
    teacher_modules, **bindings)` returns an `optima.interfaces.Loss`, given both
    models' `Module`s (and `student_layouts`, `teacher_layouts` when both models
    have a `token_layout(module)` method). Bound uncalled:
    `distillation.loss = @optima_loss`.
    Returns nothing; every implementation is called (not first-result-wins).
    """


@hookspec
def optima_register_bandit_environments(register):
    """Simulated bandits for `optima bandit` (compare policies in seconds).

    Receives `register(name, factory)`: `factory(seeds, rounds, rng, **bindings)`
    returns an `optima.bandit.Environment` (expected and drawn rewards of every
    arm at every round, for `seeds` runs), `rounds` None meaning its own
    default, `rng` a `numpy.random.Generator` to draw from. Picked by name:
    `optima bandit -e <name>` or `bandit.environments = ['<name>']`; its
    bindings under `<name>_environment` (`replay_environment.path = '...'`).
    Returns nothing; every implementation is called (not first-result-wins).
    """
