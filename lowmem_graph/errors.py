"""One exception type for mistakes a user can fix: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input (spec, model id, data, flags): the message says what and where."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM: the message says how to resume; the CLI exits with `code` (128 + signal)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code
