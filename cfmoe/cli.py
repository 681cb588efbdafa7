"""Entry points speak to users in one line: a user's mistake (a ValueError or a missing file) prints
`<prog>: error: <what was wrong and what is valid>` and exits with status 2; anything else is a bug and keeps
its traceback.

    @user_errors("python -m cfmoe.stages")
    def main(argv=None): ...
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def user_errors(prog: str) -> Callable:
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except USER_ERRORS as e:
                message = " ".join(str(e).split()) or type(e).__name__
                print(f"{prog}: error: {message}", file=sys.stderr)
                raise SystemExit(2) from None
        return run
    return wrap
