"""This process's ``__main__`` as worker processes see it.

Functions. A worker gets a pipeline's own transforms by reference (module and name) and
imports them. A function defined in a notebook, ``python -c``, a script read from stdin
(``python -``) or an interactive session lives in a ``__main__`` that no other process can
import; such a function is wrapped in ``ByValue``, which pickles it with cloudpickle (its code
and the globals it uses) and so reaches forked, forkserver and spawned workers and Dask workers
alike.

``main_importable`` says whether a worker started by forkserver or spawn can import this
process's ``__main__``; ``main_hidden`` keeps multiprocessing from making a worker try, when it
cannot (it would run the path ``<stdin>`` and die before its first task).

The guard. A forkserver or spawn worker runs the main script again (as ``__mp_main__``) before
it starts. A script that calls watcher at its top level, without ``if __name__ ==
"__main__":``, would start a run inside each worker, whose workers would do the same:
``refuse_in_bootstrap`` (called where a run starts) ends such a worker at once and silently with
EXIT_UNGUARDED_MAIN, and its supervisor raises one error saying what to change
(``unguarded_message``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any

from watcher.engine.slot import EXIT_UNGUARDED_MAIN


def main_importable() -> bool:
    """Whether another process can import this one's ``__main__`` (a module run with ``-m``,
    or a script file that exists), as multiprocessing's forkserver and spawn workers do."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return bool(path) and os.path.isfile(str(path))


@contextlib.contextmanager
def main_hidden() -> Iterator[None]:
    """While workers start: a ``__main__.__file__`` that names no file (``<stdin>``) is hidden,
    so that forkserver and spawn workers do not try to run it (they need nothing from it: its
    functions come by value)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or main_importable():
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


class ByValue:
    """A function pickled by value (cloudpickle); called like the function itself."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __reduce__(self) -> tuple[Callable[[bytes], ByValue], tuple[bytes]]:
        import cloudpickle  # noqa: PLC0415 - only where such a function is sent

        return _load, (cloudpickle.dumps(self.func),)

    def __repr__(self) -> str:
        return f"ByValue({self.func!r})"


def _load(data: bytes) -> ByValue:
    return ByValue(pickle.loads(data))  # noqa: S301 - our own parent's pickle of the pipeline


def refuse_in_bootstrap() -> None:
    """Where a run starts: in a worker process still running the main script at its start
    (multiprocessing's bootstrap), end it now with EXIT_UNGUARDED_MAIN and not a word."""
    from multiprocessing import process  # noqa: PLC0415

    if getattr(process.current_process(), "_inheriting", False):
        os._exit(EXIT_UNGUARDED_MAIN)


def unguarded_message(start_method: str) -> str:
    """The one error a supervisor raises when a worker ended with EXIT_UNGUARDED_MAIN."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or "the main script"
    return (f"worker processes cannot start: each one runs {path} again as it starts (start "
            f"method {start_method}), and it calls watcher at its top level. Put the code that "
            "calls watcher under `if __name__ == \"__main__\":`")
