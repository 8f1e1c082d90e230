"""The one exception type that means "the user asked for something that cannot be done"."""


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2 by the CLI."""
