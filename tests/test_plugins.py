"""Plugin loading and `optima plugins`, through the CLI and its exit codes: broken,
misspelled, duplicate and disabled plugins, installed as real distributions
(a `*.dist-info` with `entry_points.txt` on `sys.path`, what pip leaves)."""
import json
import re
import sys
import textwrap
import types
from importlib import metadata
from pathlib import Path

import gin
import pytest
from typer.testing import CliRunner

from optima import config, hookspecs, registry
from optima.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
HOOKS = [name for name in vars(hookspecs) if name.startswith("optima_")]

runner = CliRunner()

GOOD = """
from optima.hookspecs import hookimpl
from optima.plugins.policies.paper import RandomPolicy


class GoodPolicy(RandomPolicy):
    '''A random policy from a third-party plugin.'''


@hookimpl
def optima_register_policies(register):
    register("good", GoodPolicy)
"""
BROKEN = "raise RuntimeError('boom: missing dependency')\n"
MISSPELLED = """
from optima.hookspecs import hookimpl


@hookimpl
def optima_register_polices(register):
    register("typo", object)
"""
DUPLICATE = """
from optima.plugins.policies.paper import RandomPolicy


def optima_register_policies(register):  # unmarked: picked up by its name
    register("optima", RandomPolicy)
"""
RAISES_IN_HOOK = """
from optima.hookspecs import hookimpl
from optima.plugins.rewards.loss_decrement import kd_reward


@hookimpl
def optima_register_rewards(register):
    register("half_done", kd_reward)


@hookimpl
def optima_register_policies(register):
    raise KeyError("no such arm layout")
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where `install(...)` puts plugin distributions."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("OPTIMA_DISABLE_PLUGINS", raising=False)
    installed: list[str] = []

    def install(dist: str, entry_points: dict[str, str], modules: dict[str, str], version: str = "1.0") -> None:
        for name, source in modules.items():
            (folder / f"{name}.py").write_text(textwrap.dedent(source))
            installed.append(name)
        info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(
            "[optima]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
        (info / "RECORD").write_text("".join(f"{name}.py,,\n" for name in modules)  # the files it installed
                                     + "".join(f"{info.name}/{f},,\n" for f in ("METADATA", "RECORD")))

    yield install
    for name in installed:
        sys.modules.pop(name, None)
    config.setup(external_plugins=False)  # leave gin with the built-ins only


def _invoke(*args, env=None):
    # a wide terminal: rich would otherwise shorten the dry run's table cells
    result = runner.invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})
    return result.exit_code, result.stdout, result.stderr


def _plugins_json(*args, env=None):
    code, out, err = _invoke("plugins", "--json", *args, env=env)
    return code, json.loads(out), err


def _dry_run(*extra, env=None):
    return _invoke("run", "tests/gin/tiny_ve.gin", "--dry-run", *extra, env=env)


# -- optima plugins ------------------------------------------------------------

def test_plugins_json_lists_builtins_with_version_hooks_and_components():
    code, data, err = _plugins_json()
    assert code == 0, err
    builtin = next(p for p in data["plugins"] if p["name"] == registry.BUILTIN)
    assert builtin["builtin"] and builtin["status"] == "ok"
    assert builtin["version"] == metadata.version("optima-distill")
    assert builtin["hooks"] == list(registry.HOOKS.values())
    components = {c["gin"]: c for c in builtin["components"]}
    assert components["coca_model"]["modules"] == ["image", "text", "multimodal"]
    assert components["coca_model"]["doc"]
    for gin_name in ("synthetic_ve_task", "attentional_pooler_head", "optima_policy", "random_policy",
                     "layerwise_policy", "fixed_policy", "kd_reward", "layerwise_reward", "combined_reward",
                     "optima_loss"):
        assert gin_name in components
    assert {c["kind"] for c in builtin["components"]} == set(registry.HOOKS)
    assert data["errors"] == []


def test_plugins_table_names_plugins_and_components():
    code, out, _ = _invoke("plugins")
    assert code == 0
    for text in ("optima.builtin", "optima-distill", "coca_model", "image, text, multimodal", "optima_policy",
                 "kd_reward", "optima_loss"):
        assert text in out


def test_plugins_table_piped_gives_every_description_whole():
    """Not on a terminal (a pipe, a file, CI), even 80 columns wide: nothing is cut short."""
    result = runner.invoke(app, ["plugins"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    docs = [c.doc for c in registry.load(external=False).components.values() if c.doc]
    assert docs and [d for d in docs if d not in result.stdout] == []
    assert "…" not in result.stdout


def test_a_stage_is_keyed_on_the_plugin_code_it_uses(site, tmp_path, monkeypatch):
    """A student distilled with a third-party policy is cached; after the plugin's
    code changes (a fixed policy reinstalled), the next run makes it again and
    reuses the teacher; `OPTIMA_FRESH=student` makes it again regardless."""
    from conftest import TINY
    from optima.experiment import plugin_code

    site("optima-good", {"good": "good_plugin"}, {"good_plugin": GOOD})
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    args = ["run", "tests/gin/tiny_ve.gin", *(a for b in [*TINY, "distillation.rounds = 2"] for a in ("-b", b)),
            "-b", "distillation.policy = @good_policy"]

    def run(name):
        code, out, err = _invoke(*args, "--run-dir", str(tmp_path / name))
        assert code == 0, out + err
        return out

    config.setup()
    config.parse(["tests/gin/tiny_ve.gin"])
    assert plugin_code(gin.config_str()) == {}  # built-ins only: keys as they were
    assert "teacher: reusing" not in run("first")
    out = run("again")
    assert "teacher: reusing" in out and "student: reusing" in out

    module = tmp_path / "site" / "good_plugin.py"
    module.write_text(module.read_text() + "\n# fixed: a bug in the policy\n")
    out = run("fixed")
    assert "teacher: reusing" in out and "student: reusing" not in out

    monkeypatch.setenv("OPTIMA_FRESH", "student")
    out = run("fresh")
    assert "teacher: reusing" in out and "student: reusing" not in out


def test_declared_modules_are_the_models_modules():
    from conftest import TINY_COCA
    from optima.plugins.models.coca import coca_model

    declared = registry.load(external=False).components["coca_model"].modules
    assert coca_model(TINY_COCA, layers=(1, 1, 1)).module_names() == declared


# -- broken plugins --------------------------------------------------------------

def test_a_plugin_that_raises_on_import_is_reported_and_the_rest_works(site):
    site("optima-broken", {"broken": "broken_plugin"}, {"broken_plugin": BROKEN}, version="0.3")
    site("optima-good", {"good": "good_plugin"}, {"good_plugin": GOOD})

    code, data, err = _plugins_json()
    assert code == 0
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins["broken"]["status"] == "failed" and plugins["broken"]["version"] == "0.3"
    assert "RuntimeError: boom: missing dependency" in plugins["broken"]["error"]
    assert plugins["good"]["status"] == "ok" and [c["gin"] for c in plugins["good"]["components"]] == ["good_policy"]
    assert "plugin 'broken' failed to load" in err and "boom" in err

    code, out, err = _invoke("plugins")
    assert code == 0 and "failed" in out and "good_policy" in out

    # a run goes on without it, and the good plugin's policy is usable from gin
    code, out, err = _dry_run("-b", "distillation.policy = @good_policy")
    assert code == 0, out + err
    assert "plugin 'broken' failed to load" in out + err and "boom" in out + err
    assert "@good_policy" in out


def test_a_plugin_whose_hook_raises_is_skipped_as_a_whole(site):
    site("optima-halfway", {"halfway": "halfway_plugin"}, {"halfway_plugin": RAISES_IN_HOOK})
    code, data, err = _plugins_json()
    assert code == 0
    halfway = next(p for p in data["plugins"] if p["name"] == "halfway")
    assert halfway["status"] == "failed" and halfway["components"] == []
    assert halfway["error"].startswith("optima_register_policies: KeyError")
    reg = registry.load()
    assert "half_done_reward" not in reg.components  # registered by its other hook, dropped with it
    assert reg.failures["halfway"] == halfway["error"]


PICKY = """
from optima.errors import ConfigError
from optima.plugins.policies.paper import RandomPolicy


class PickyPolicy(RandomPolicy):
    def __init__(self, num_arms, seed=0, level=0, named=True):
        if level < 0:
            raise ConfigError("picky_policy.level must be >= 0" if named else "level must be >= 0")
        super().__init__(num_arms, seed)


def optima_register_policies(register):
    register("picky", PickyPolicy)
"""


def test_a_plugin_components_config_error_names_it_once(site):
    site("optima-picky", {"picky": "picky_plugin"}, {"picky_plugin": PICKY})
    for named, expected in ((True, "optima: error: picky_policy.level must be >= 0"),
                            (False, "optima: error: picky_policy: level must be >= 0")):
        code, out, err = _dry_run("-b", "distillation.policy = @picky_policy", "-b", "picky_policy.level = -1",
                                  "-b", f"picky_policy.named = {named}")
        assert code == 2 and (out + err).strip() == expected


SETS = """
from optima.plugins.policies.paper import RandomPolicy


class SetPolicy(RandomPolicy):
    def state_dict(self):
        return {**super().state_dict(), "seen": {1, 2}}


def optima_register_policies(register):
    register("set", SetPolicy)
"""


def test_a_policy_state_a_checkpoint_cannot_hold_is_refused_before_any_work(site):
    site("optima-set", {"set": "set_plugin"}, {"set_plugin": SETS})
    code, out, err = _dry_run("-b", "distillation.policy = @set_policy")
    assert code == 2 and (out + err).strip() == (
        "optima: error: set_policy.state_dict(): cannot checkpoint a set at seen; a policy's state holds nested "
        "dicts, lists and tuples of tensors, numpy arrays, numbers, strings, bools and None")


# -- malformed plugins -------------------------------------------------------------

def test_a_misspelled_hook_skips_that_plugin_for_runs_with_one_warning_and_fails_optima_plugins(site):
    site("optima-typo", {"typo": "typo_plugin"}, {"typo_plugin": MISSPELLED})
    site("optima-good", {"good": "good_plugin"}, {"good_plugin": GOOD})

    # a run that does not use it goes on, with one warning line naming the plugin and the hook
    code, out, err = _dry_run("-b", "distillation.policy = @good_policy")
    assert code == 0, out + err
    lines = [line for line in (out + err).splitlines() if "typo" in line]
    assert len(lines) == 1 and lines[0].startswith("optima: warning: plugin 'typo' (typo_plugin)")
    assert "'optima_register_polices' (did you mean 'optima_register_policies'?)" in lines[0]
    assert "'typo' (optima-typo 1.0) is skipped (OPTIMA_DISABLE_PLUGINS=typo turns it off)" in lines[0]
    assert "Traceback" not in out + err and "@good_policy" in out

    code, data, err = _plugins_json()  # still lists everything, says what is wrong, and fails
    assert code == 2
    typo = next(p for p in data["plugins"] if p["name"] == "typo")
    assert typo["status"] == "invalid" and "optima_register_polices" in typo["error"]
    assert next(p for p in data["plugins"] if p["name"] == "good")["status"] == "ok"
    assert any(p["name"] == registry.BUILTIN and p["components"] for p in data["plugins"])
    assert "optima: error:" in err and "optima_register_polices" in err

    with pytest.raises(registry.PluginError, match="optima_register_polices"):  # the library's strict load
        registry.load(strict=True)


NO_HOOK = """
from optima.plugins.policies.paper import RandomPolicy


def optima_registr_policies(register):  # no hook starts so: not even seen as a misspelled hook
    register("lost", RandomPolicy)
"""


def test_a_plugin_that_implements_no_hook_loads_with_a_warning(site):
    site("optima-nohook", {"nohook": "nohook_plugin"}, {"nohook_plugin": NO_HOOK})
    expected = ("optima: warning: plugin 'nohook' (nohook_plugin) implements no hook, so it adds nothing; "
                "'optima_registr_policies' (did you mean 'optima_register_policies'?); hooks are functions named ")
    code, data, err = _plugins_json()
    assert code == 0
    nohook = next(p for p in data["plugins"] if p["name"] == "nohook")
    assert nohook["status"] == "ok" and nohook["components"] == [] and nohook["hooks"] == []
    assert len(data["warnings"]) == 1 and [l for l in err.splitlines() if "nohook" in l][0].startswith(expected)
    code, out, err = _dry_run()
    assert code == 0 and [l for l in (out + err).splitlines() if "nohook" in l][0].startswith(expected)


def test_an_unmarked_misspelling_is_caught_too():
    plugin = types.ModuleType("unmarked_typo")
    exec("def optima_register_model(register):\n    pass\n", plugin.__dict__)
    with pytest.raises(registry.PluginError, match="optima_register_model'.*did you mean 'optima_register_models'"):
        registry.load(external=False, plugins=[("unmarked_typo", plugin)])


def test_two_components_under_one_name_skip_the_later_plugin_for_runs(site):
    site("optima-dup", {"dup": "dup_plugin"}, {"dup_plugin": DUPLICATE}, version="2.1")

    code, out, err = _dry_run()
    assert code == 0, out + err
    line = next(l for l in (out + err).splitlines() if "dup" in l)
    assert line.startswith("optima: warning: policy 'optima' (optima_policy) is registered by both ")
    assert "'optima.builtin' (optima-distill" in line and "'dup' (optima-dup 2.1) is skipped" in line
    assert "@optima_policy" in out  # the built-in one

    code, data, err = _plugins_json()
    assert code == 2 and len(data["errors"]) == 1 and "'dup'" in data["errors"][0]
    assert next(p for p in data["plugins"] if p["name"] == "dup")["status"] == "invalid"


def test_two_distributions_under_one_plugin_name_is_an_error_naming_both(site):
    site("optima-first", {"same": "first_plugin"}, {"first_plugin": GOOD})
    site("optima-second", {"same": "second_plugin"}, {"second_plugin": GOOD})
    code, out, err = _invoke("plugins")
    assert code == 2
    assert "optima-first" in err and "optima-second" in err and "'same'" in err


def test_component_names_must_be_identifiers_and_modules_only_for_models():
    for body, message in (('register("my-policy", object)', "not a Python identifier"),
                          ('register("ok", object, modules=("a",))', "only applies to models")):
        plugin = types.ModuleType("bad_register")
        exec(f"def optima_register_policies(register):\n    {body}\n", plugin.__dict__)
        with pytest.raises(registry.PluginError, match=message):
            registry.load(external=False, plugins=[("bad_register", plugin)])


# -- disabling plugins ----------------------------------------------------------------

def test_disabled_plugins_load_built_ins_only(site):
    site("optima-typo", {"typo": "typo_plugin"}, {"typo_plugin": MISSPELLED})
    site("optima-broken", {"broken": "broken_plugin"}, {"broken_plugin": BROKEN})

    for args, env in ((("--no-plugins",), None), ((), {"OPTIMA_DISABLE_PLUGINS": "1"})):
        code, data, err = _plugins_json(*args, env=env)
        assert code == 0, err
        assert not data["external_plugins"] and data["errors"] == []
        statuses = {p["name"]: p["status"] for p in data["plugins"]}
        assert statuses == {registry.BUILTIN: "ok", "typo": "disabled", "broken": "disabled"}
        assert "broken_plugin" not in sys.modules  # not even imported

        code, out, err = _dry_run(*args, env=env)
        assert code == 0, out + err
        assert "failed to load" not in out + err

    code, out, err = _invoke("plugins")  # enabled again: the misspelling is an error
    assert code == 2


def test_disabling_plugins_by_name(site):
    site("optima-typo", {"typo": "typo_plugin"}, {"typo_plugin": MISSPELLED})
    site("optima-good", {"good": "good_plugin"}, {"good_plugin": GOOD})
    code, data, err = _plugins_json(env={"OPTIMA_DISABLE_PLUGINS": "typo"})
    assert code == 0, err
    assert {p["name"]: p["status"] for p in data["plugins"]} == {
        registry.BUILTIN: "ok", "good": "ok", "typo": "disabled"}


def test_setup_with_another_plugin_set_drops_the_old_components(site):
    site("optima-good", {"good": "good_plugin"}, {"good_plugin": GOOD})
    config.setup()
    config.parse([], ["distillation.policy = @good_policy"])
    config.setup(external_plugins=False)
    with pytest.raises(Exception, match="unknown configurable 'good_policy'"):
        config.parse([], ["distillation.policy = @good_policy"])
    gin.clear_config()


# -- documentation ---------------------------------------------------------------------

def test_every_hookspec_says_what_it_receives_returns_and_whether_the_first_result_wins():
    assert HOOKS == list(registry.HOOKS.values())
    for name in HOOKS:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Receives" in doc and "Returns" in doc and "first-result-wins" in doc, name
        assert not getattr(getattr(hookspecs, name), "optima_spec", {}).get("firstresult"), name


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^### ", text, flags=re.M)
    return {part.split("\n", 1)[0].strip(): part for part in parts[1:]}


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_hook_is_documented_with_an_example():
    sections = _sections(DOCS.read_text())
    undocumented = [h for h in HOOKS if h not in sections]
    assert not undocumented, f"hooks without a '### <hook>' section in docs/plugins.md: {undocumented}"
    for hook in HOOKS:
        blocks = _python_blocks(sections[hook])
        assert blocks and f"def {hook}(register)" in blocks[0], f"{hook}: no example in its section"


def test_the_docs_examples_run_as_plugins():
    """Every documented plugin module loads, registers what it says, and its
    components work on a small input."""
    import torch

    from optima.interfaces import Loss

    examples = [b for b in _python_blocks(DOCS.read_text()) if "@hookimpl" in b]
    plugins = []
    for i, source in enumerate(examples):
        module = types.ModuleType(f"docs_example_{i}")
        exec(compile(source, f"docs/plugins.md example {i}", "exec"), module.__dict__)
        plugins.append((module.__name__, module))
    reg = registry.load(external=False, plugins=plugins)
    documented = {c.gin_name: c for name, _ in plugins for c in reg.of_plugin(name)}
    assert set(documented) >= {"greedy_policy", "text_only_model", "parity_task", "mean_pool_head",
                               "round_robin_policy", "own_arm_reward", "no_attention_loss",
                               "two_coins_environment"}
    hooks = {h for name, _ in plugins for h in reg.plugins[name].hooks}
    assert hooks == set(HOOKS)

    model = documented["text_only_model"].factory(width=32, layers=2)
    assert model.module_names() == documented["text_only_model"].modules
    task = documented["parity_task"].factory(size=8)
    batch = next(task.batches("train", 4, shuffle=True, seed=0))
    # its batch source: DataLoader workers make the same batches as `batches`
    from optima.data import BatchStream

    stream = BatchStream(task, "train", 3, 0, torch.device("cpu"), workers=2)
    made = [next(stream) for _ in range(3)]
    stream.close()
    assert all(torch.equal(m[k], b[k]) for m, b in zip(made, task.batches("train", 3, shuffle=True, seed=0))
               for k in b)
    head = documented["mean_pool_head"].factory(model, task)
    logits = head(model(batch))
    assert logits.shape == (4, 2) and torch.isfinite(task.loss(logits, batch))
    for name in ("greedy_policy", "round_robin_policy"):
        policy = documented[name].factory(num_arms=3, seed=0)
        arm = policy.select()
        policy.update(arm, 0.5)
        policy.load_state_dict(policy.state_dict())
        assert 0 <= policy.select() < 3
    from optima.interfaces import RoundLosses

    before = RoundLosses({}, {"image": {"hidden": 2.0, "attn": 1.0}, "text": {"hidden": 9.0, "attn": 9.0}}, ("text",))
    after = RoundLosses({}, {"image": {"hidden": 1.0, "attn": 1.0}, "text": {"hidden": 1.0, "attn": 1.0}}, ("image",))
    assert documented["own_arm_reward"].factory()(before, after) == pytest.approx((0.5 + 0.0) / 2)
    loss = documented["no_attention_loss"].factory(model.distill_modules(), model.distill_modules())
    assert isinstance(loss, Loss)
    import numpy as np

    from optima import bandit

    coins = {"two_coins": documented["two_coins_environment"].factory}
    env = bandit.make_environment("two_coins", 3, 40, factories=coins)
    assert env.means.shape == (3, 40, 2) and set(np.unique(env.rewards)) <= {0.0, 1.0}


# -- bandit environments from plugins (optima bandit) ------------------------------------

COINS = """
import numpy as np

from optima.bandit import Environment
from optima.hookspecs import hookimpl


def two_coins(seeds, rounds, rng, p=0.7):
    '''Two coins, a fair one and a biased one.'''
    rounds = rounds or 50
    means = np.broadcast_to(np.array([0.5, p]), (seeds, rounds, 2)).copy()
    return Environment("two_coins", means, (rng.random(means.shape) < means).astype(float))


def lopsided(seeds, rounds, rng):
    '''Means and rewards of different shapes: refused.'''
    return Environment("lopsided", np.zeros((seeds, 5, 2)), np.zeros((seeds, 4, 2)))


@hookimpl
def optima_register_bandit_environments(register):
    register("two_coins", two_coins)
    register("lopsided", lopsided)
"""


def test_optima_bandit_runs_an_environment_a_plugin_registers_with_its_bindings(site, tmp_path):
    site("optima-coins", {"coins": "coins_plugin"}, {"coins_plugin": COINS})
    out = tmp_path / "out"
    code, stdout, stderr = _invoke("bandit", "-e", "two_coins", "-p", "fixed", "--seeds", "2", "--rounds", "30",
                                   "--jobs", "1", "--out", str(out), "-b", "fixed_policy.arm = 0",
                                   "-b", "two_coins_environment.p = 0.9")
    assert code == 0, stdout + stderr
    data = json.loads((out / "results.json").read_text())
    assert data["environments"]["two_coins"] == {"arms": 2, "rounds": 30, "seeds": 2}
    # the fair coin every round: (0.9 - 0.5) * 30, the plugin's binding applied
    assert [r["final"] for r in data["results"]] == [[pytest.approx(12.0)] * 2]
    code, stdout, stderr = _invoke("bandit", "-e", "lopsided", "-p", "fixed", "--seeds", "2", "--out",
                                   str(tmp_path / "o2"))
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stdout + stderr
    assert "environment 'lopsided': means and rewards must both have shape" in lines[0]
    assert not (tmp_path / "o2").exists()
    code, stdout, stderr = _invoke("bandit", "-e", "three_coins", "--seeds", "2", "--out", str(tmp_path / "o3"))
    assert code == 2 and "unknown environment 'three_coins'" in stdout + stderr and "two_coins" in stdout + stderr
