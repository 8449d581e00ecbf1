"""The one exception type for bad user input.

The CLI catches `ConfigError` and prints it as a single line with exit code 2, so every message
should name the problem and say what to do about it.

A message that names a setting writes it as a `{name}` placeholder and lists the name in
`fields`: a Python caller reads the keyword (`replay_rollouts`), and the CLI, through
`as_flags`, the flag it typed (`--replay-rollouts`). The library never words its errors as flags.

    >>> err = ConfigError("{policy_lag} 40 is not below the run's 39 updates", "policy_lag")
    >>> str(err), err.as_flags()
    ("policy_lag 40 is not below the run's 39 updates", "--policy-lag 40 is not below the run's 39 updates")
"""

from collections.abc import Callable


class ConfigError(ValueError):
    """Bad user input: an unknown id or name, an invalid value, an unreadable file.

    Args:
      message: the one-line message; with `fields`, each named as {field} in it.
      fields: the config fields or run options (Python keyword names) the message names.
    """

    def __init__(self, message: str, *fields: str):
        self.template = message
        self.fields = fields
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with each field written by `spell(name)`."""
        text = self.template
        for name in self.fields:  # not str.format: a path or value in the message may hold braces
            text = text.replace("{" + name + "}", spell(name))
        return text

    def as_flags(self) -> str:
        """The message with each field written as the CLI flag that sets it."""
        return self.spelled(lambda name: "--" + name.replace("_", "-"))
