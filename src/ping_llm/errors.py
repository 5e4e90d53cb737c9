"""The one exception type that means "the caller gave us bad input".

The CLI maps it to exit status 2 with the message on stderr; the HTTP service maps it to 422. Every
module raises it (or a subclass) for input it cannot accept, and anything else for bugs.
"""


class InputError(ValueError):
    """Bad user input: a malformed address, an impossible value, a file that is not what it says."""
