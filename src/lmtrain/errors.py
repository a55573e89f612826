"""The one exception type that means "the user gave bad input": printed as one line, exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad setting, missing file, bad checkpoint).

    The entrypoints print ``error: <message>`` without a traceback and exit with status 2.
    """

    exit_code = 2
