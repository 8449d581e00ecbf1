"""The one exception type for bad user input.

The CLI catches `ConfigError` and prints its message as a single line with exit code 2, so every
message should name the problem and say what to do about it.
"""


class ConfigError(ValueError):
    """Bad user input: an unknown id or name, an invalid value, an unreadable file."""
