"""Hook specifications: the only way components enter OPTIMA.

Every hook receives `register(name, factory)`; call it once per component.
`name` is short (`"coca"`, `"optima"`); the component becomes the gin
configurable `<name>_<kind>` (`coca_model`, `optima_policy`). `factory` is a
function or class whose keyword arguments are the gin-bindable parameters.
All implementations are called (no hook is first-result-wins); registering one
name twice for a kind is an error that names both plugins.
"""
import pluggy

hookspec = pluggy.HookspecMarker("optima")
hookimpl = pluggy.HookimplMarker("optima")


@hookspec
def optima_register_models(register):
    """Models. `factory(**bindings) -> optima.interfaces.DistillableModel`.
    Example: `register("coca", coca_model)` gives `@teacher/coca_model()` in gin."""


@hookspec
def optima_register_tasks(register):
    """Tasks. `factory(**bindings) -> optima.interfaces.Task`."""


@hookspec
def optima_register_heads(register):
    """Task heads. `factory(model, task, **bindings) -> optima.interfaces.Head`, given the
    `DistillableModel` it sits on and the `Task`; bound unevaluated in gin
    (`@attentional_pooler_head`, no parentheses)."""


@hookspec
def optima_register_policies(register):
    """Bandit policies. `factory(num_arms, seed, **bindings) -> optima.interfaces.Policy`;
    bound unevaluated (`distill.policy = @optima_policy`)."""


@hookspec
def optima_register_rewards(register):
    """Rewards. `factory(**bindings) -> optima.interfaces.Reward`;
    bound evaluated (`distill.reward = @kd_reward()`)."""


@hookspec
def optima_register_losses(register):
    """Distillation objectives. `factory(student_modules, teacher_modules, **bindings)
    -> optima.interfaces.Loss`; bound unevaluated (`distill.loss = @optima_loss`)."""
