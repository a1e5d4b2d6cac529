"""Python thread states of the threads libfuse calls the adapter on (``ThreadStates``).

The callbacks run on real threads Python did not start (``pthread_create`` through ctypes), as
libfuse's workers are. Two callbacks in a row on one such thread: its start routine, then a
thread-exit handler (glibc's ``__cxa_thread_atexit_impl``, which runs while the thread's Python
state can still be found). A ``threading.local`` value set in the first callback is seen by the
second only if the thread's state lived on between them.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import types
from collections.abc import Callable

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("pthreads and glibc's thread-exit handlers through ctypes", allow_module_level=True)
pytest.importorskip("mfusepy")

from dicomfuse.backends.fuse import ThreadStates  # noqa: E402

libc = ctypes.CDLL(None)
START = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
AT_EXIT = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
if not hasattr(libc, "__cxa_thread_atexit_impl"):
    pytest.skip("not glibc", allow_module_level=True)
libc.__cxa_thread_atexit_impl.argtypes = [AT_EXIT, ctypes.c_void_p, ctypes.c_void_p]


def two_callbacks(first: Callable[[], None], then: Callable[[], None]) -> None:
    """``first`` as a new pthread's start routine, ``then`` when that thread ends."""
    at_exit = AT_EXIT(lambda _obj: then())
    libc_symbol = ctypes.cast(libc.free, ctypes.c_void_p)  # names the DSO the handler belongs to

    def start(_arg: int | None) -> None:
        first()
        assert libc.__cxa_thread_atexit_impl(at_exit, None, libc_symbol) == 0

    routine = START(start)
    thread = ctypes.c_ulong()
    assert libc.pthread_create(ctypes.byref(thread), None, routine, None) == 0
    assert libc.pthread_join(thread, None) == 0  # ctypes lets go of the GIL meanwhile


def seen_by_second_callback(keep: Callable[[], None] | None) -> object:
    probe = threading.local()
    seen: list[object] = []

    def first() -> None:
        if keep is not None:
            keep()
        probe.value = "set by the first callback"

    two_callbacks(first, lambda: seen.append(getattr(probe, "value", None)))
    assert len(seen) == 1
    return seen[0]


def test_without_keeping_each_callback_has_a_new_thread_state():
    assert seen_by_second_callback(keep=None) is None  # what every FUSE request paid before


def test_a_kept_state_lives_from_one_callback_to_the_next():
    states = ThreadStates()
    assert seen_by_second_callback(keep=states.keep) == "set by the first callback"
    assert states.kept == 1


def test_no_more_than_the_limit_are_kept():
    states = ThreadStates(limit=1)
    assert seen_by_second_callback(keep=states.keep) == "set by the first callback"
    assert seen_by_second_callback(keep=states.keep) is None  # a second thread goes without
    assert states.kept == 1


def test_a_thread_keeps_one_state_however_many_callbacks():
    states = ThreadStates()
    assert seen_by_second_callback(keep=lambda: (states.keep(), states.keep(), states.keep())) is not None
    assert states.kept == 1


def test_every_libfuse_callback_goes_through_keep():
    from dicomfuse.backends.fuse import _FUSE

    kept: list[int] = []
    fuse = _FUSE.__new__(_FUSE)  # no mount: only the wrapper mfusepy puts around each callback
    fuse.thread_states = types.SimpleNamespace(keep=lambda: kept.append(1))
    assert fuse._wrapper(lambda: 7) == 7
    assert kept == [1]
