"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`:
2 for bad input (a file, a flag), 3 for a file the system could not read or write (disk full,
read-only or vanished folder, permission denied, a file changed or removed while it was read)."""


class AATrtError(Exception):
    exit_code = 2  # bad input


class InputError(AATrtError):
    """A file or argument the user gave is missing, unreadable or of the wrong kind."""


class StorageError(AATrtError):
    """Reading or writing a file failed in the system, not because of what the file holds: no
    space left, a read-only file system, permission denied, a folder or file that vanished or
    changed while in use. The message names the file and the cause."""

    exit_code = 3


class CheckpointError(AATrtError):
    """A checkpoint or weight file is not what it should be (layout, keys, shapes, truncation)."""


def first_keys(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


class OptionError(InputError):
    """A parameter with a value the library cannot use. The message names the parameter as the
    Python API spells it (`steps=0: ...`); the CLI says it with its flag instead (`as_flag`).
    Other parameters named in `problem` are written in backticks (`context_frames`), so that the
    CLI can name their flags too."""

    def __init__(self, param: str, value, problem: str):
        self.param, self.value, self.problem = param, value, problem
        super().__init__(f"{param}={value!r}: {problem}")

    def as_flag(self, flags: dict[str, str] | None = None) -> str:
        """'--steps 0: must be ...': the CLI's spelling (flags maps parameters that differ)."""
        import re

        def flag(param: str) -> str:
            return (flags or {}).get(param, "--" + param.replace("_", "-"))

        problem = re.sub(r"`([a-z_]+)`", lambda m: flag(m.group(1)), self.problem)
        if isinstance(self.value, bool):  # a switch: its name says it
            return f"{flag(self.param)}: {problem}"
        return f"{flag(self.param)} {self.value}: {problem}"
