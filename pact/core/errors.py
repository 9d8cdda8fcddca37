"""The one exception type users see: a single clear line."""


class PactError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with code 2."""
