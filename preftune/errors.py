"""The one exception type a user sees.

Anything a user can fix (a bad file, a wrong path, an out-of-range setting) is raised as
`PreftuneError` with one sentence that names the thing and says what to do. The CLI prints
that sentence and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PreftuneError(Exception):
    """A problem with the user's input, reported as one clear sentence (CLI exit status 2)."""
