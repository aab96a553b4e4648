"""The `audio` entry point (`[project.entry-points.optima]` in pyproject.toml).

OPTIMA imports this module and calls the hooks below; components become the gin
configurables `audio_coca_model`, `synthetic_av_task` and
`epsilon_greedy_policy`. Imports happen inside the hooks so that a plain
`optima --help` stays fast.
"""
from optima.hookspecs import hookimpl


@hookimpl
def optima_register_models(register):
    from optima_audio.model import MODULES, audio_coca_model

    register("audio_coca", audio_coca_model, modules=MODULES)


@hookimpl
def optima_register_tasks(register):
    from optima_audio.task import SyntheticAudioVisual

    register("synthetic_av", SyntheticAudioVisual)


@hookimpl
def optima_register_policies(register):
    from optima_audio.policy import EpsilonGreedyPolicy

    register("epsilon_greedy", EpsilonGreedyPolicy)
