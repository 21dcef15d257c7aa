"""The error for bad input: a config value, or a file or record a config value names."""


class ConfigError(ValueError):
  """Cannot run with this config or input; the message names the key (or file and line) and what
  to do. The CLI prints it as one line and exits with status 2."""
