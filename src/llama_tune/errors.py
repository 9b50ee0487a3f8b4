"""The one base class of errors a user can fix: the CLI prints them without a traceback."""


class UserError(Exception):
    """A problem in the user's input (recipe, data, model name, run folder), not a bug."""
