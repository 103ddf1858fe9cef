"""User-facing errors: one clear sentence, a non-zero exit, no traceback.

Anything a user can cause raises a `UserError` subclass; the CLI prints its message on one line and
exits with its `exit_code`. One rule decides the code:
  2  the command line asks for something not allowed (ConfigError): a config key, type or value, sizes
     that contradict the launch, or an output that would overwrite what it must not (an existing folder,
     a folder that is not a run, the run being exported) — change the command;
  1  the command is right, but something it reads or runs on cannot serve it: a corpus or tokenizer
     (DataError), a checkpoint or model folder (CheckpointError), a run folder in use or with a damaged
     file (RunFolderError), the machine's memory, disk or device (ResourceError), or training itself
     (the loss stayed non-finite) — fix that input, or wait, and run the same command again.
Ctrl-C and SIGTERM exit 130 and 143 after saving a checkpoint.
"""


class UserError(Exception):
    """An error caused by the user's input. The message names the bad value and what is allowed."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(UserError):
    """A config key, type or value that is not allowed (exit code 2)."""

    exit_code = 2


class DataError(UserError):
    """A corpus, tokenizer or data file that cannot be used (exit code 1)."""

    exit_code = 1


class CheckpointError(UserError):
    """A checkpoint or model folder that is missing, corrupt or belongs to another model (exit code 1)."""

    exit_code = 1


class RunFolderError(UserError):
    """A run folder in use by another process, or holding a damaged file (exit code 1)."""

    exit_code = 1


class ResourceError(UserError):
    """The machine cannot serve the request: memory, disk space or a device (exit code 1)."""

    exit_code = 1


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds: the config validators' one-line check."""
    if not condition:
        raise ConfigError(message)


def require_positive_int(value, key: str) -> None:
    require(isinstance(value, int) and value >= 1,
            f"{key}={value} is not allowed; it must be an integer >= 1.")
