"""The one exception type a user ever sees as a one-line message.

Stage scripts catch `UserError` in their `main` and print `error: <message>` with exit code 2, so a bad
path, an unknown name or a corrupt file never shows a traceback. Library code raises it with a message
that says what was looked for, where, and how to fix it.
"""


class UserError(Exception):
    """A problem with the user's input (paths, names, files), reported as one line, never a traceback."""
