"""One exception type for mistakes a user can fix: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input (spec, model id, data, flags): the message says what and where."""
