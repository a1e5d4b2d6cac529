"""How the FUSE adapter's ``translate`` logs a core error: its errno for the kernel, one line."""

from __future__ import annotations

import errno
import logging
from typing import Any

import pytest

mfusepy = pytest.importorskip("mfusepy")

from dicomfuse.backends.fuse import FuseOperations  # noqa: E402
from dicomfuse.core.errors import FsError  # noqa: E402


class Raising:
    """A Vfs whose every call raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.notify_changed = None

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any) -> Any:
            raise self.exc
        return fail


class Handle:
    fh = 1


def logged(exc: FsError, call: Any, caplog: pytest.LogCaptureFixture) -> tuple[int, list[tuple[int, str]]]:
    ops = FuseOperations(Raising(exc))  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger="dicomfuse.backends.fuse"), pytest.raises(mfusepy.FuseOSError) as info:
        call(ops)
    return info.value.errno, [(r.levelno, r.getMessage()) for r in caplog.records]


def test_a_message_naming_its_operation_is_not_prefixed_again(caplog: pytest.LogCaptureFixture) -> None:
    """It read "write: write: /127.0.0.1/u0.dcm would exceed …": the core's message and the
    adapter's operation name, both."""
    exc = FsError(errno.EFBIG, "write: /127.0.0.1/u0.dcm would exceed the largest file", logging.ERROR)
    code, records = logged(exc, lambda ops: ops.write("/127.0.0.1/u0.dcm", b"x", 0, Handle()), caplog)
    assert code == errno.EFBIG
    assert records == [(logging.ERROR, "write: /127.0.0.1/u0.dcm would exceed the largest file")]


def test_a_message_without_its_operation_is_prefixed(caplog: pytest.LogCaptureFixture) -> None:
    exc = FsError(errno.ENOENT, "no such entry: /s/x.dcm")
    code, records = logged(exc, lambda ops: ops.getattr("/s/x.dcm"), caplog)
    assert code == errno.ENOENT
    assert records == [(logging.DEBUG, "getattr: no such entry: /s/x.dcm")]
    exc = FsError(errno.EPERM, "writer: not this one")  # another word that only begins the same
    assert logged(exc, lambda ops: ops.write("/s", b"", 0, Handle()), caplog)[1][-1] == (
        logging.DEBUG, "write: writer: not this one")
