"""Library noise out of the terminal: when a background write fails (a full disk), Orbax (through
absl logging) and asyncio log a whole traceback per thread and per pending task — hundreds of lines
before the command's own one-line error. While a command runs, their warnings and errors, and
exceptions that escape other threads or native callbacks, go to a log file instead; one line says
where. As a process's entry point the redirection stays until exit (pending futures report their
exceptions when the interpreter collects them, after the command has returned)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

LIBRARY_LOGGERS = ("absl", "asyncio")


class _Counting(logging.FileHandler):
    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True, encoding="utf-8")
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"))
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        super().emit(record)


@contextlib.contextmanager
def library_logs_to_file(command: str, until_exit: bool = False) -> Iterator[Path]:
    """Send the libraries' warnings and errors (and exceptions uncaught in other threads or native
    callbacks) to a file while `command` runs — or, `until_exit`, for the rest of the process;
    afterwards say on stderr how many there were and where, if any."""
    path = Path(tempfile.gettempdir()) / f"jaxgpt-{command}-{os.getpid()}.log"
    handler = _Counting(path)
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(logger, logger.propagate) for logger in loggers]
    hooks = threading.excepthook, sys.excepthook, sys.unraisablehook
    log = logging.getLogger("asyncio")

    def thread_hook(args) -> None:
        if args.exc_type is not SystemExit:
            log.error("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                      exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def callback_hook(exc_type, exc_value, exc_tb) -> None:  # PyErr_Print from a native callback (TensorStore)
        if threading.current_thread() is threading.main_thread() and not until_exit:
            return hooks[1](exc_type, exc_value, exc_tb)
        log.error("uncaught exception in a callback", exc_info=(exc_type, exc_value, exc_tb))

    def unraisable_hook(unraisable) -> None:
        log.error("exception ignored in %r", unraisable.object,
                  exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))

    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    threading.excepthook, sys.excepthook, sys.unraisablehook = thread_hook, callback_hook, unraisable_hook
    try:
        yield path
    finally:
        gc.collect()  # futures whose exception nobody read log it when collected: while the file still listens
        if not until_exit:
            threading.excepthook, sys.excepthook, sys.unraisablehook = hooks
            for logger, propagate in saved:
                logger.removeHandler(handler)
                logger.propagate = propagate
            handler.close()
        if handler.records:
            print(f"[jaxgpt] {handler.records} warning/error message(s) from libraries (Orbax, asyncio) are in {path}",
                  file=sys.stderr)
