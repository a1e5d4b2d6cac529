"""Exceptions described for logs without their messages.

An exception's message can quote the data that raised it: ``int()`` and pydicom quote element
values (``invalid literal for int() with base 10: 'Doe^John'``), and a value can be a patient's
name. So a log line says *what* was raised and *where* (file, line, function), never what it
says. The frames of a traceback are code, not data: :func:`format_without_messages` keeps them.
"""

from __future__ import annotations

import errno
import os
import traceback

_CAUSE = "\n\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\n\nDuring handling of the above exception, another exception occurred:\n\n"


def name(exc: BaseException) -> str:
    """The exception's class (module-qualified unless built in), with the errno's symbol for an
    ``OSError`` (``FileNotFoundError [ENOENT]``)."""
    cls = type(exc)
    text = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if isinstance(code, int) and code in errno.errorcode:
        text += f" [{errno.errorcode[code]}]"
    return text


def where(exc: BaseException) -> str:
    """``dicomfile.py:192 in _expected_pixel_bytes``: the innermost frame the exception passed
    through, or "" when it was never raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f"{os.path.basename(last.filename)}:{last.lineno} in {last.name}"


def describe(exc: BaseException) -> str:
    """``ValueError at dicomfile.py:192 in _expected_pixel_bytes``: the exception's type and
    where it was raised, never its message."""
    place = where(exc)
    return f"{name(exc)} at {place}" if place else name(exc)


def format_without_messages(exc: BaseException) -> str:
    """A traceback as Python prints it, chained exceptions included, with each exception's
    message left out (its type is kept)."""
    chain: list[tuple[BaseException, str]] = []  # outermost first, with the link to its cause
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__cause__ is not None:
            link, following = _CAUSE, current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            link, following = _CONTEXT, current.__context__
        else:
            link, following = "", None
        chain.append((current, link))
        current = following
    parts: list[str] = []
    for item, link in reversed(chain):
        if parts:
            parts.append(link)
        frames = "".join(traceback.format_tb(item.__traceback__))
        if frames:
            parts.append("Traceback (most recent call last):\n" + frames)
        parts.append(f"{name(item)} (message not logged: it may quote patient data)")
    return "".join(parts)
