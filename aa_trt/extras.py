"""Optional dependencies, asked for by the name of the extra that installs them.

diffusers and transformers are needed by `aa-trt convert` alone (it reads the SD base folder as
those libraries save it); a run uses the package's own VAE and CLIP. So they are the `convert`
extra, and a command that needs them says so in one line instead of a traceback.
"""
from __future__ import annotations

import importlib.util

from aa_trt.errors import InputError

EXTRAS = {"convert": ("diffusers", "transformers")}


class MissingExtra(InputError):
    """A command needs an optional dependency that is not installed."""


def missing(extra: str) -> tuple[str, ...]:
    """The modules of `extra` that cannot be imported here (found without importing them)."""
    return tuple(m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None)


def require(extra: str, command: str) -> None:
    """One line naming what to install when `command` cannot run without `extra`."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(f"`aa-trt {command}` needs {' and '.join(absent)}: "
                           f'pip install "aa-trt[{extra}]"')
