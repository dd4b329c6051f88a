"""The error types every module raises for a user's mistake. Dependency-free, so that any module,
config.py included, can import it without importing anything else of r3jax."""


class InputError(ValueError):
    """A user's mistake (a config value, a data file, a checkpoint): the message is one line
    naming the key, file or path, and the CLI exits with status 2 without a traceback."""


class ConfigError(InputError):
    """A bad config value; the message starts with `config.<key>`."""


class RecordError(InputError):
    """A malformed data record; the message names the file and line (jsonl) or index (json)."""


class UnreadableFileError(InputError):
    """A file r3jax wrote earlier (a stored config, a result, a checkpoint's metadata) that cannot
    be read back, e.g. cut short by a crash mid-write: the message names the file and the way out."""
