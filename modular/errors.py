"""User-facing errors: one clear sentence, a non-zero exit, no traceback.

Anything a user can cause (a bad config value, a missing file, a corrupt checkpoint) raises
`UserError`; the CLI prints its message on one line and exits with `exit_code`.
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
    """A checkpoint that is missing, corrupt or belongs to another model (exit code 1)."""

    exit_code = 1


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds: the config validators' one-line check."""
    if not condition:
        raise ConfigError(message)


def require_positive_int(value, key: str) -> None:
    require(isinstance(value, int) and value >= 1,
            f"{key}={value} is not allowed; it must be an integer >= 1.")
