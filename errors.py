"""User-facing errors: main.py prints their message as one line and exits with status 2."""


class VaddError(Exception):
    """Bad input (config value, data, checkpoint) with a message that names the fix."""


class ConfigError(VaddError, ValueError):
    """A bad configuration value; the message is meant to be shown to the user as is."""


class CheckpointError(VaddError, RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class NonFiniteLossError(VaddError):
    """The training loss became NaN or infinite."""


class DataUnavailableError(VaddError, RuntimeError):
    """The data (or its tokenizer) cannot be produced here; the message says how to fix it.

    A VaddError, so main.py prints it as one line instead of a stack trace.
    """
