"""`optima bandit`: every policy on every simulated environment (`optima/bandit.py`),
many seeds in seconds on the CPU; prints regret mean and std per policy and
environment, writes `results.json`, `table.md` and `regret.png`."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from optima.errors import ConfigError

console = Console()
DEFAULT_CONFIG = "bandit/default.gin"  # in OPTIMA's gin/ folder


def _reference(name: str) -> str:
    name = name.strip().lstrip("@")
    return "@" + (name if name.endswith("_policy") else f"{name}_policy")


def bandit_command(config: str | None, bindings: Sequence[str], policies: Sequence[str], envs: Sequence[str],
                   seeds: int | None, rounds: int | None, jobs: int, out: str | None,
                   external_plugins: bool | None) -> dict:
    import gin
    import torch

    from optima import bandit
    from optima import config as cfg
    from optima.arms import build_policy
    from optima.validation import check_policy

    registry = cfg.setup(external_plugins)
    for name, error in registry.failures.items():
        console.print(f"[yellow]warning:[/] plugin {name!r} failed to load and is skipped: {error}")
    config = config or str(cfg.GIN_DIR / DEFAULT_CONFIG)
    extra = list(bindings)
    if policies:
        extra.append("bandit.policies = [" + ", ".join(_reference(p) for p in policies) + "]")
    if envs:
        extra.append("bandit.environments = [" + ", ".join(repr(e) for e in envs) + "]")
    if seeds is not None:
        extra.append(f"bandit.seeds = {seeds}")
    if rounds is not None:
        extra.append(f"bandit.rounds = {rounds}")
    cfg.parse([config], extra)
    try:
        settings = bandit.settings()
    except Exception as e:
        raise cfg.translate_call_error(e) from None
    n_seeds, n_rounds = settings["seeds"], settings["rounds"]
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ConfigError(f"bandit.seeds = {n_seeds!r} must be an integer >= 1")
    if n_rounds is not None and (isinstance(n_rounds, bool) or not isinstance(n_rounds, int) or n_rounds < 1):
        raise ConfigError(f"bandit.rounds = {n_rounds!r} must be an integer >= 1 (or None)")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} must be >= 1")
    labels = bandit.policy_labels()
    if len(set(labels)) != len(labels):
        raise ConfigError(f"bandit.policies lists a policy twice: {labels}")
    factories = dict(zip(labels, settings["policies"]))
    torch.set_num_threads(1)
    start = time.time()
    # every registered environment, plugins' included, through gin (its bindings apply)
    known = {c.name: gin.get_configurable(c.gin_name) for c in registry.of_kind("environment")}
    environments = {}
    for name in settings["environments"]:
        try:
            environments[name] = bandit.make_environment(name, n_seeds, n_rounds, settings["seed"], known)
        except ConfigError:
            raise
        except Exception as e:  # a plugin's environment that fails: one line naming it
            translated = cfg.translate_call_error(e)
            if isinstance(translated, ConfigError):
                raise translated from None
            detail = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError(f"environment {name!r} failed: {type(e).__name__}: {detail}") from None
    # every policy's bindings are checked on every environment before the long part, in one line
    refs = gin.get_bindings("bandit", resolve_references=False)["policies"]
    for ref, factory in zip(refs, factories.values()):
        for env in environments.values():
            try:
                check_policy(ref, [], env.num_arms, lambda: build_policy(factory, env.num_arms, 0, env.features, env.rounds))
            except Exception as e:
                raise cfg.translate_call_error(e) from None
    with console.status(f"{len(factories)} policies x {len(environments)} environments x {n_seeds} seeds "
                        f"on {jobs} process(es)"):
        results = bandit.benchmark(factories, environments, jobs=jobs)
    seconds = time.time() - start
    cpu = sum(r.cpu_seconds for r in results)
    command = "optima bandit" + (f" {config}" if config != str(cfg.GIN_DIR / DEFAULT_CONFIG) else "") + "".join(
        f" -b {b!r}" for b in extra)
    meta = {"command": command, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "jobs": jobs,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                       f"torch {torch.__version__}",
            "config": gin.config_str()}
    out_dir = Path(out or bandit.default_out_dir())
    paths = bandit.write_results(out_dir, results, environments, meta)
    print_table(results, list(environments), n_seeds)
    console.print(f"{len(results)} runs of {n_seeds} seeds in {seconds:.1f} s ({jobs} process(es); the "
                  f"simulations took {cpu:.1f} CPU-seconds); wrote {paths['table']}, {paths['json']}, "
                  f"{paths['figure']}")
    return {"results": results, "paths": paths, "seconds": seconds}


def mean_std_text(mean: float, std: float) -> str:
    """`mean±std`, the mean to 3 significant digits and the std to the mean's
    decimals (`41.9±2.2`, `1.65±0.07`, `162±6`): short enough for 80 columns."""
    import math

    decimals = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean and math.isfinite(mean) else 2
    return f"{mean:.{decimals}f}±{std:.{decimals}f}"


def print_table(results, environments: list[str], seeds: int) -> None:
    from rich import box

    # no vertical rules, environment names broken after their underscores: 5 environments fit 80 columns
    table = Table(title=f"total regret, mean±std over {seeds} seeds (lower is better; best in bold)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("policy", no_wrap=True)
    for env in environments:
        table.add_column(env.replace("_", "_\n"), justify="right", no_wrap=True)
    cell = {(r.policy, r.environment): r for r in results}
    best = {e: min(r.mean for r in results if r.environment == e) for e in environments}
    for policy in dict.fromkeys(r.policy for r in results):
        row = []
        for e in environments:
            r = cell[policy, e]
            text = mean_std_text(r.mean, r.std)
            row.append(f"[bold]{text}[/]" if r.mean == best[e] else text)
        table.add_row(policy, *row)
    console.print(table)
