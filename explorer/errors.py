"""The one exception type the project raises for anything a user can fix."""


class ExplorerError(Exception):
    """A problem the user can act on: the message says what went wrong and what to do.

    Pages catch it and show ``st.error``; the CLI prints the message on one line and
    exits non-zero. Anything else escaping the core is a bug.
    """


class ExplorerWarning(UserWarning):
    """Something the project ignored or changed on the user's behalf, and said so.

    The CLI prints each as one ``warning:`` line on stderr; the run goes on.
    """
