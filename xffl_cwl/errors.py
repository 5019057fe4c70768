"""The one exception type that means "the user gave us something wrong"."""


class InputError(Exception):
    """Bad input: reported as one line naming the culprit and the fix, exit code 2."""

    exit_code = 2
