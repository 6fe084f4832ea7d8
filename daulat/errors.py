"""The one exception type daulat raises for bad input (config, data, checkpoint, request).

The CLI turns it into a single line on stderr and exit code 2; library users can catch it.
"""


class DaulatError(Exception):
    """Bad input from the user: the message names the problem (file, field, tensor)."""
