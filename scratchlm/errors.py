"""The one exception type for mistakes a user can make (paths, configs, corpora, prompts, checkpoints).

The command line catches ``UserError`` and prints its message as one line, exit status 2, no
traceback. Anything else is a bug and keeps its traceback. Messages name the problem and the fix.
"""


class UserError(Exception):
    """A problem with the user's input, not with scratchlm: printed as one line, exit status 2."""
