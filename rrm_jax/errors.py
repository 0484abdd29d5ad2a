"""The one exception type for mistakes a user can fix (bad file, bad flag, bad config)."""


class UserError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits with code 2."""
