"""User-facing errors: the CLI prints them as one diagnosis line and exits with code 2."""


class PoetError(Exception):
    """A mistake the user can fix (bad config, bad data, missing file).

    The message says what was wrong, where, and how to fix it. The CLI prints it without a traceback.
    """
