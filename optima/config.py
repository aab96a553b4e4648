"""gin glue: make every component configurable, parse files and bindings, and turn
gin's errors into one-line `ConfigError`s that name the file, line or binding.

A gin file is a path, or `package:path/in/package.gin`: a file shipped inside an
installed Python package (a plugin's wheel), to run (`optima run
optima_audio:gin/audio_av.gin`) or to include from any gin file (`include
'optima_audio:gin/audio_av.gin'`).
"""
from __future__ import annotations

import difflib
import io
import importlib.resources
import logging
import os
import re
import tokenize
from pathlib import Path
from typing import Callable, Sequence

import gin

from optima import registry as registry_mod
from optima.errors import ConfigError

#: gin name -> (gin's complete selector, factory) registered by this process
#: (gin cannot register a name twice)
_REGISTERED: dict[str, tuple[str, Callable]] = {}
#: The repository's `gin/` folder, so `include 'common/x.gin'` works from anywhere.
GIN_DIR = Path(__file__).resolve().parent.parent / "gin"
_OPTIMIZERS = ("AdamW", "Adam", "SGD", "Adafactor")


def _register(name: str, factory: Callable, module: str | None = None) -> None:
    key = f"{module}.{name}" if module else name
    current = _REGISTERED.get(key)
    if current is not None and current[1] is factory:
        return
    if current is not None:  # another plugin set in this process (tests): replace it
        _unregister(key)
    # gin files the configurable under `<module>.<name>`, the module defaulting to the factory's
    selector = f"{module or getattr(factory, '__module__', None) or ''}.{name}".lstrip(".")
    gin.external_configurable(factory, name=name, module=module)
    _REGISTERED[key] = (selector, factory)


def _unregister(key: str) -> None:
    selector, _ = _REGISTERED.pop(key)
    if selector in gin.config._REGISTRY:
        gin.config._REGISTRY.pop(selector)  # gin has no public unregister


def setup(external_plugins: bool | None = None, plugins=(), strict: bool = False) -> registry_mod.Registry:
    """Load plugins and make every component and core stage a gin configurable.

    A malformed plugin is skipped and listed in the registry's `errors` (with
    `strict`, `PluginError`), so one broken package does not stop every run.
    Callable again in one process with another plugin set (tests, `--no-plugins`):
    components of plugins no longer loaded stop being configurable.
    """
    import torch

    import optima.bandit  # noqa: F401  (defines bandit, for `optima bandit`)
    import optima.experiment  # noqa: F401  (defines experiment, teacher_training, distillation)

    reg = registry_mod.load(external=external_plugins, plugins=plugins, strict=strict)
    for stale in set(_REGISTERED) - set(reg.components) - {f"torch.optim.{o}" for o in _OPTIMIZERS}:
        _unregister(stale)
    for component in reg.components.values():
        _register(component.gin_name, component.factory)
    for opt in _OPTIMIZERS:
        _register(opt, getattr(torch.optim, opt), module="torch.optim")
    return reg


def known_names() -> list[str]:
    names = set()
    for selector, _ in gin.config._REGISTRY.items():
        names.add(selector)
        names.add(selector.rsplit(".", 1)[-1])
    return sorted(names)


#: `package:path` (not a Windows drive, `C:...`)
_PACKAGE_FILE = re.compile(r"(?![A-Za-z]:)([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([^/\\].*)")


def package_file(spec: str) -> Path | None:
    """The file `spec` names if it reads `package:path/in/package` and is no
    existing path, else None: `optima_audio:gin/audio_av.gin` is `gin/audio_av.gin`
    inside the installed package `optima_audio` (its package data). Raises
    `ConfigError` when the package is not installed or lacks the file."""
    m = _PACKAGE_FILE.fullmatch(spec)
    if m is None or os.path.exists(spec):
        return None
    package, relative = m.groups()
    try:
        root = Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        raise ConfigError(f"{spec}: no installed Python package {package!r} (pip install it, or give a path)") \
            from None
    except Exception as e:  # the package raised on import
        raise ConfigError(f"{spec}: importing {package} failed: {type(e).__name__}: {e}") from None
    path = root / relative
    if not path.is_file():
        shipped = sorted(str(p.relative_to(root)) for p in root.rglob("*.gin"))
        raise ConfigError(f"{spec}: package {package} ({root}) has no file {relative}; "
                          + (f"it ships {', '.join(shipped)}" if shipped else
                             "it ships no .gin file (are they declared as package data?)"))
    return path


@gin.config.register_file_reader(lambda path: _PACKAGE_FILE.fullmatch(path) is not None and
                                 not os.path.exists(path))
def _open_package_file(spec: str):
    """gin's reader for `include 'package:path'` (gin asks every registered reader)."""
    return open(package_file(spec), encoding="utf-8")


def parse(config_files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Clear gin and parse `config_files` (paths or `package:path`, see
    `package_file`) then `bindings`; raise `ConfigError`."""
    gin.clear_config()
    config_files = [str(package_file(f) or f) for f in config_files]
    for f in config_files:
        if not os.path.isfile(f):
            raise ConfigError(f"{f}: no such gin file")
        _require_text(f)
    for b in bindings:
        if "=" not in b:
            raise ConfigError(f"binding {b!r} is not of the form 'configurable.parameter = value' "
                              f"(e.g. -b 'distillation.rounds = 10')")
    # Includes resolve next to the given files, then in OPTIMA's gin/. gin only
    # appends search paths, so they are restored afterwards: a later parse must
    # not find includes in an earlier config's folder.
    search_paths = list(gin.config._LOCATION_PREFIXES)
    for f in config_files:
        gin.add_config_file_search_path(os.path.dirname(os.path.abspath(f)))
    if GIN_DIR.is_dir():
        gin.add_config_file_search_path(str(GIN_DIR))
    # gin logs an ERROR for every search path an include is not found in
    logging.getLogger().disabled = True
    try:
        gin.parse_config_files_and_bindings(list(config_files), list(bindings), finalize_config=False)
    except SyntaxError as e:
        raise _syntax_error(e, config_files) from None
    except tokenize.TokenError as e:  # an unclosed bracket or string: gin's tokenizer gives up
        raise ConfigError(f"{_untokenizable(config_files, bindings)}: gin cannot parse it: {e.args[0]} "
                          "(a bracket or a quote is not closed?)") from None
    except UnicodeDecodeError as e:  # an included file that is not text (the given ones are checked above)
        m = re.search(r'In file "([^"]+)", line (\d+)\s+include\s+[\'"]([^\'"]+)', str(e))  # gin adds where
        included, where = (m.group(3), f"{m.group(1)}:{m.group(2)}") if m else ("a file", ", ".join(config_files))
        raise ConfigError(f"{included}: not a gin file (not UTF-8 text); it is included from {where}: include "
                          ".gin files only") from None
    except (ValueError, KeyError, IOError) as e:
        raise translate(e) from None
    finally:
        logging.getLogger().disabled = False
        gin.config._LOCATION_PREFIXES[:] = search_paths


def _syntax_error(e: SyntaxError, config_files: Sequence[str]) -> ConfigError:
    """gin's syntax error as one line. A file whose name does not end in `.gin`
    (e.g. an `include '/etc/shadow'`) is called not a gin file and nothing of it
    is quoted: gin's message and text hold its content, which a config from
    elsewhere must not be able to print into a log."""
    if not e.filename or e.filename == "<string>":
        return ConfigError(f"binding: gin syntax error: {e.msg}" + (f" in {e.text.strip()!r}" if e.text else ""))
    where = f"{e.filename}:{e.lineno}"
    if not e.filename.endswith(".gin"):
        given = os.path.abspath(e.filename) in {os.path.abspath(f) for f in config_files}
        return ConfigError(f"{where}: not a gin file (gin cannot parse it); "
                           + ("pass the experiment's .gin file" if given else
                              f"it is included from {', '.join(config_files)}: include .gin files only"))
    return ConfigError(f"{where}: gin syntax error: {e.msg}" + (f" in {e.text.strip()!r}" if e.text else ""))


def _require_text(path: str) -> None:
    """A gin file must be UTF-8 text: a binary file is named, with the line."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not a gin file (not UTF-8 text: byte {data[e.start]:#04x}); "
                          "pass the experiment's .gin file") from None


def _untokenizable(config_files: Sequence[str], bindings: Sequence[str]) -> str:
    """Which file or binding Python's tokenizer (gin's) cannot finish."""
    for text, where in [*((Path(f).read_text(encoding="utf-8"), f) for f in config_files),
                        *((b, f"binding {b!r}") for b in bindings)]:
        try:
            for _ in tokenize.generate_tokens(io.StringIO(text).readline):
                pass
        except tokenize.TokenError:
            return where
    return "a gin file it includes"


def translate(e: BaseException) -> ConfigError:
    """gin's (often multi-line) errors -> one line with a hint."""
    msg = str(e).strip().strip("'\"")
    first = msg.splitlines()[0] if msg else type(e).__name__
    location = _location(msg)
    m = re.search(r"No configurable matching (?:reference )?'@?([^'(]+)(?:\(\))?'", msg)
    if m:
        name = m.group(1).split("/")[-1]
        near = difflib.get_close_matches(name, known_names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else "; `optima plugins` lists what exists"
        return ConfigError(f"{location}unknown configurable '{m.group(1)}'{hint}")
    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", msg)
    if m:
        return ConfigError(f"{location}'{m.group(1)}' has no parameter '{m.group(2)}'")
    m = re.search(r"Required bindings for `([^`]+)` not provided in config: \[([^\]]*)\]", msg)
    if m:
        params = [p.strip(" '") for p in m.group(2).split(",")]
        return ConfigError(f"missing required binding(s) {', '.join(f'{m.group(1)}.{p}' for p in params)}: "
                           f"set them in the gin file or with -b")
    if isinstance(e, IOError) or "Unable to open file" in msg:
        return ConfigError(f"{first}")
    return ConfigError(f"{location}{first}")


def _location(msg: str) -> str:
    m = re.search(r'In file "([^"]+)", line (\d+)', msg)
    return f"{m.group(1)}:{m.group(2)}: " if m else ""


_GIN_CALL_ERRORS = ("Required bindings", "No configurable matching", "doesn't have a parameter")


def translate_call_error(e: BaseException) -> BaseException:
    """Errors gin raises when a configurable is called (e.g. a missing required
    binding) become `ConfigError`s; anything else is returned unchanged."""
    if isinstance(e, ConfigError) or not any(s in str(e) for s in _GIN_CALL_ERRORS):
        return e
    return translate(e)


def declared():
    """The parsed config's experiment (`optima.experiment.Declared`), every binding
    validated, nothing built or run; gin's errors as `ConfigError`s. Here, not in
    `optima.experiment`: this module registers the experiment's configurables, so
    it sits above it (CONTRIBUTING.md, "Floors")."""
    from optima.experiment import experiment

    try:
        return experiment(None, declared_only=True)
    except Exception as e:
        raise translate_call_error(e) from None
