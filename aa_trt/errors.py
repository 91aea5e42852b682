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
