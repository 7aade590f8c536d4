"""User-facing errors.

Every problem a user can cause (bad model name, bad budget, bad file) raises
`GateSkipError` with a one-line message. The CLI and the dashboard print that
line; anything else is a bug and is allowed to show a traceback.
"""


class GateSkipError(Exception):
    """A problem with the user's input, explained in one line."""
