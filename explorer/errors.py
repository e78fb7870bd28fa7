"""The one exception type the project raises for anything a user can fix."""


class ExplorerError(Exception):
    """A problem the user can act on: the message says what went wrong and what to do.

    Pages catch it and show ``st.error``; the CLI prints the message on one line and
    exits non-zero. Anything else escaping the core is a bug.
    """
