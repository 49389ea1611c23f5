"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class SizewiseError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (`atomic.handle_signals`): a BaseException, like KeyboardInterrupt,
    so that no `except Exception` swallows it on its way to the CLI, which cleans up and exits."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
