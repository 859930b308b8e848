"""The one exception type for mistakes a user can make (bad file, bad option, bad checkpoint).

The CLI turns it into a single line on stderr and exit status 2; the Python API lets it
propagate so that a notebook shows the message.
"""


class CharLSTMError(Exception):
    """A problem the user can fix; the message says what and how."""
