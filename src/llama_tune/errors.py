"""The one base class of errors a user can fix: the CLI prints them without a traceback."""


class UserError(Exception):
    """A problem in the user's input (recipe, data, model name, run folder), not a bug."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name when it has none), for a
    one-line error that names the cause without the library's whole explanation."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
