"""The `video` entry point (`[project.entry-points.optima]` in pyproject.toml).

OPTIMA imports this module and calls the hooks below; components become the gin
configurables `video_coca_model` and `moving_shapes_task`.
"""
from optima.hookspecs import hookimpl


@hookimpl
def optima_register_models(register):
    from optima_video.model import MODULES, video_coca_model

    register("video_coca", video_coca_model, modules=MODULES)


@hookimpl
def optima_register_tasks(register):
    from optima_video.task import SyntheticMovingShapes

    register("moving_shapes", SyntheticMovingShapes)
