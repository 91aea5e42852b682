"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""


class AATrtError(Exception):
    exit_code = 2  # bad input


class InputError(AATrtError):
    """A file or argument the user gave is missing, unreadable or of the wrong kind."""


class CheckpointError(AATrtError):
    """A checkpoint or weight file is not what it should be (layout, keys, shapes, truncation)."""


def first_keys(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


class OptionError(InputError):
    """A parameter with a value the library cannot use. The message names the parameter as the
    Python API spells it (`steps=0: ...`); the CLI says it with its flag instead (`as_flag`)."""

    def __init__(self, param: str, value, problem: str):
        self.param, self.value, self.problem = param, value, problem
        super().__init__(f"{param}={value!r}: {problem}")

    def as_flag(self, flags: dict[str, str] | None = None) -> str:
        """'--steps 0: must be ...': the CLI's spelling (flags maps parameters that differ)."""
        flag = (flags or {}).get(self.param, "--" + self.param.replace("_", "-"))
        if isinstance(self.value, bool):  # a switch: its name says it
            return f"{flag}: {self.problem}"
        return f"{flag} {self.value}: {self.problem}"
