"""Every shipped gin file parses with the registered components."""
from pathlib import Path

import gin
import pytest

from optima import config

GIN_FILES = sorted(str(p) for p in Path(__file__).resolve().parent.parent.joinpath("gin").rglob("*.gin"))


@pytest.mark.parametrize("path", GIN_FILES)
def test_gin_file_parses(path):
    config.setup()
    config.parse([path])
    assert gin.config_str()  # something was bound
    gin.clear_config()


def test_reward_swap_is_one_binding():
    config.setup()
    config.parse(["gin/quickstart.gin"], ["distillation.reward = @kd_reward()"])
    reward = gin.query_parameter("distillation.reward")
    assert reward.selector == "kd_reward"
    gin.clear_config()
