"""The built-in plugin: registers OPTIMA's own components through the same hooks
as any third-party plugin."""
from optima.hookspecs import hookimpl


@hookimpl
def optima_register_models(register):
    from optima.plugins.coca import coca_model

    register("coca", coca_model)


@hookimpl
def optima_register_tasks(register):
    from optima.plugins.synthetic_ve import SyntheticVisualEntailment

    register("synthetic_ve", SyntheticVisualEntailment)


@hookimpl
def optima_register_heads(register):
    from optima.plugins.heads import attentional_pooler_head

    register("attentional_pooler", attentional_pooler_head)


@hookimpl
def optima_register_policies(register):
    from optima.plugins import policies

    register("optima", policies.ThompsonPolicy)
    register("fixed", policies.FixedPolicy)
    register("random", policies.RandomPolicy)
    register("layerwise", policies.LayerwisePolicy)


@hookimpl
def optima_register_rewards(register):
    from optima.plugins import rewards

    register("kd", rewards.kd_reward)
    register("layerwise", rewards.layerwise_reward)
    register("combined", rewards.combined_reward)


@hookimpl
def optima_register_losses(register):
    from optima.plugins.losses import optima_loss

    register("optima", optima_loss)
