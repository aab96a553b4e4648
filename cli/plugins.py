"""`optima plugins`: every plugin with its version and hooks, and every component
it registers (models with their modules, tasks, heads, policies, rewards, losses).

Plugins that fail to load are listed with their error and the rest still loads
(exit code 0); malformed ones (misspelled hook, duplicate name) are listed too,
but the command exits 2 (`optima run` skips them with a warning).
"""
from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from optima import registry as registry_mod

console = Console()


def describe(registry: registry_mod.Registry) -> dict[str, Any]:
    """The registry as plain data (what `--json` prints)."""
    plugins = []
    for info in registry.plugins.values():
        components = []
        for c in registry.of_plugin(info.name):
            entry = {"kind": c.kind, "name": c.name, "gin": c.gin_name, "doc": c.doc}
            if c.kind == "model":
                entry["modules"] = list(c.modules) if c.modules is not None else None
            components.append(entry)
        plugins.append({"name": info.name, "version": info.version, "distribution": info.distribution,
                        "module": info.module, "builtin": info.builtin, "status": info.status,
                        "error": info.error, "hooks": list(info.hooks), "components": components})
    return {"external_plugins": registry.external, "plugins": plugins, "errors": list(registry.errors),
            "warnings": list(registry.warnings)}


def plugins_command(as_json: bool, external: bool | None) -> int:
    registry = registry_mod.load(external=external, strict=False)
    data = describe(registry)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
    else:
        print_tables(data)
    for line in registry.warning_lines(malformed=False):  # malformed ones are errors here
        typer.echo(line, err=True)
    for error in registry.errors:
        typer.echo(f"optima: error: {error}", err=True)
    return 2 if registry.errors else 0


_STATUS = {"ok": "[green]ok[/]", "failed": "[yellow]failed[/]", "invalid": "[red]invalid[/]",
           "disabled": "[dim]disabled[/]"}


def print_tables(data: dict[str, Any]) -> None:
    # On a terminal, descriptions are cut to its width; piped or redirected (a
    # file, grep, CI logs) they are printed whole, one line per component.
    out = console if console.is_terminal else Console(width=100_000, soft_wrap=True)
    plugins = Table(title="plugins")
    for col in ("plugin", "version", "distribution", "status", "hooks"):
        plugins.add_column(col, no_wrap=col != "hooks")
    for p in data["plugins"]:
        hooks = ", ".join(h.removeprefix("optima_register_") for h in p["hooks"])
        plugins.add_row(p["name"], p["version"] or "-", p["distribution"] or p["module"],
                        _STATUS.get(p["status"], p["status"]), hooks or "-")
    out.print(plugins)
    for p in data["plugins"]:
        if not p["components"]:
            continue
        components = Table(title=f"{p['name']}: components (gin name = <name>_<kind>)")
        # name columns at full width; modules wrap; the description gets what is left, on one line
        gin_width = max(len(c["gin"]) for c in p["components"])
        modules_width = max((len(", ".join(c["modules"])) for c in p["components"] if c.get("modules")),
                            default=7)
        modules_width = min(max(modules_width, 7), 24)
        left = console.width - (6 + gin_width + modules_width + 13)
        components.add_column("kind", min_width=6, no_wrap=True)
        components.add_column("gin name", min_width=gin_width, no_wrap=True)
        components.add_column("modules", width=modules_width)
        components.add_column("description", no_wrap=True, overflow="ellipsis",
                              max_width=max(left, 10) if out is console else None)
        for c in p["components"]:
            modules = ", ".join(c["modules"]) if c.get("modules") else ("?" if c["kind"] == "model" else "")
            components.add_row(c["kind"], c["gin"], modules, c["doc"])
        out.print(components)
    if not data["external_plugins"]:
        out.print("external plugins disabled (--no-plugins or OPTIMA_DISABLE_PLUGINS): built-ins only")
