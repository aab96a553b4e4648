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


def test_includes_resolve_next_to_this_parse_s_files_only(tmp_path):
    """gin keeps search paths across parses; OPTIMA restores them, so a second
    config cannot pick up an include from the first one's folder."""
    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        d.mkdir()
        (d / "main.gin").write_text("include 'part.gin'\n")
    (first / "part.gin").write_text("distillation.rounds = 3\n")
    config.setup()
    config.parse([str(first / "main.gin")])
    assert gin.query_parameter("distillation.rounds") == 3
    with pytest.raises(config.ConfigError, match="part.gin"):
        config.parse([str(second / "main.gin")])
    gin.clear_config()
