"""Errors raised for bad input: each names the file (or manifest row) and the problem.

The CLI turns any `InputError` into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad user input (a study, a label file, a manifest row, an argument).

    The message always starts with the offending path when there is one, so a batch job's log
    says which study failed and why.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        # One line, always: decoders and ITK put several lines in their messages, and a batch
        # log (or the CLI's "file: problem" contract) must keep one study per line.
        self.problem = one_line(problem)
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)

    def __reduce__(self):
        # Rebuilt from (path, problem), so the error crosses a process boundary (ingest workers).
        return type(self), (self.path, self.problem)


class StudyReadError(InputError):
    """A CT study (DICOM folder or image file) could not be read as an axial CT volume."""


class LabelError(InputError):
    """A label or mask image is unreadable, not integer, negative, or does not match its image."""


class ManifestError(InputError):
    """A manifest file or one of its rows is invalid."""


def one_line(text: str) -> str:
    """`text` with its lines joined by "; " (blank lines and surrounding spaces dropped)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def error_line(err: BaseException, *, with_type: bool = True) -> str:
    """`err` as one line for a log, a results.csv row or a CLI message.

    A traceback embedded in the message (absl and ml_collections put the config file's in theirs)
    is cut to its first and last lines; whitespace runs become one space. With `with_type`, an
    error other than an InputError (whose message already names the file and the problem) is
    prefixed by its type, e.g. "MemoryError: ...".
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = [lines[0].rstrip(":"), lines[-1]]
    text = " ".join(" ".join(lines).split())
    if with_type and not isinstance(err, InputError):
        return f"{type(err).__name__}: {text}"
    return text
