"""How a message names a command of this installation (`optima`, `tensorboard`)
so that it runs as printed: the bare name when the shell's PATH finds this
installation's, else its path (after `make demo`, which installs into `.venv`
without activating it: `.venv/bin/optima`)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def program(name: str = "optima") -> str:
    """`name` as the user can type it in the current directory (module doc)."""
    here = Path(sys.executable).parent / name  # the environment's scripts folder (a venv's bin/)
    if not here.is_file():
        return name
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(here):
        return name
    relative = os.path.relpath(here)
    return relative if not relative.startswith("..") else str(here)
