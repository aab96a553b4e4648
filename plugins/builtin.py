"""The built-in plugin: registers OPTIMA's own components through the same hooks
as any third-party plugin."""
from optima.hookspecs import hookimpl


@hookimpl
def optima_register_models(register):
    from optima.plugins.models.coca import MODULES, coca_model

    register("coca", coca_model, modules=MODULES)


@hookimpl
def optima_register_tasks(register):
    from optima.plugins.tasks.coco_captions import CocoCaptions
    from optima.plugins.tasks.nlvr2 import Nlvr2
    from optima.plugins.tasks.snli_ve import SnliVe
    from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment
    from optima.plugins.tasks.synthetic_world import tasks as world
    from optima.plugins.tasks.vqa import Vqa

    register("synthetic_ve", SyntheticVisualEntailment)
    register("snli_ve", SnliVe)
    register("vqa", Vqa)
    register("nlvr2", Nlvr2)
    register("coco_captions", CocoCaptions)
    register("world_ve", world.WorldEntailment)
    register("world_vqa", world.WorldVqa)
    register("world_nlvr2", world.WorldNlvr2)
    register("world_captions", world.WorldCaptions)


@hookimpl
def optima_register_heads(register):
    from optima.plugins.heads.vl_heads import attentional_pooler_head, caption_head, pair_head

    register("attentional_pooler", attentional_pooler_head)
    register("pair", pair_head)
    register("caption", caption_head)


@hookimpl
def optima_register_policies(register):
    from optima.plugins.policies import beta, changepoint, exp3, greedy, grouped, paper, rotting, thompson, ucb

    register("optima", paper.ThompsonPolicy)  # the paper's, the default
    register("fixed", paper.FixedPolicy)
    register("random", paper.RandomPolicy)
    register("layerwise", paper.LayerwisePolicy)
    # beyond the paper (docs/policies.md)
    register("discounted_ts", thompson.DiscountedThompsonPolicy)
    register("sw_ts", thompson.SlidingWindowThompsonPolicy)
    register("discounted_ucb", ucb.DiscountedUCBPolicy)
    register("sw_ucb", ucb.SlidingWindowUCBPolicy)
    register("exp3", exp3.Exp3Policy)
    register("eps_greedy", greedy.EpsilonGreedyPolicy)
    register("grouped_ts", grouped.GroupedThompsonPolicy)  # finer arms: layer groups
    register("raw_ucb", rotting.RawUCBPolicy)  # rewards that decay with an arm's own plays
    register("glr_ucb", changepoint.GlrUCBPolicy)  # change-point detection, no horizon needed
    register("decayed_beta_ts", beta.DecayedBetaThompsonPolicy)  # binary rewards


@hookimpl
def optima_register_rewards(register):
    from optima.plugins.rewards import loss_decrement as rewards, task_aware

    register("kd", rewards.kd_reward)
    register("layerwise", rewards.layerwise_reward)
    register("combined", rewards.combined_reward)
    register("heldout_task", task_aware.heldout_task_reward)  # rewards that see the task (docs/method.md)
    register("heldout_gain", task_aware.heldout_gain_reward)
    register("alignment", task_aware.alignment_reward)
    register("advantage", task_aware.advantage_reward)


@hookimpl
def optima_register_losses(register):
    from optima.plugins.losses.optima_loss import optima_loss

    register("optima", optima_loss)


@hookimpl
def optima_register_bandit_environments(register):
    from optima.bandit import ENVIRONMENTS

    for name, factory in ENVIRONMENTS.items():  # optima bandit -e <name>
        register(name, factory)
