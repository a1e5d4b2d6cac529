"""The fault proxy of the fault suite (tests/fakes/fault_proxy.py): its stalls, against a loopback
upstream. A stall that does not stall would make a "hung server" test test a dropped connection."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests

from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.http_server import LoopbackServer, Reply
from tests.mounting import wait_for

STALLED = (5.0, 0.5)  # connect, read: a stalled request ends in a read timeout, a dropped one at once


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    upstream = LoopbackServer(lambda seen: Reply(200, b"upstream"))
    with FaultProxy(upstream.base_url) as p:
        yield p
    upstream.stop()


def get(proxy: FaultProxy, timeout: float | tuple[float, float] = 30.0) -> requests.Response:
    with requests.Session() as session:  # a new connection each time
        return session.get(f"{proxy.url}/x", timeout=timeout)


@pytest.mark.parametrize("free", ["clear", "release"])
def test_a_stall_after_a_clear_or_release_stalls_again(proxy: FaultProxy, free: str) -> None:
    proxy.fail("GET", "/x", times=None, stall=True)
    getattr(proxy, free)()
    if free == "clear":
        proxy.fail("GET", "/x", times=None, stall=True)
    with pytest.raises(requests.ReadTimeout):
        get(proxy, STALLED)
    proxy.clear()
    assert get(proxy).text == "upstream"


def test_release_frees_the_stalled_requests_and_only_those(proxy: FaultProxy) -> None:
    proxy.fail("GET", "/x", times=2, stall=True)
    outcome: list[BaseException | requests.Response] = []

    def stalled() -> None:
        try:
            outcome.append(get(proxy))
        except requests.RequestException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=stalled)
    thread.start()
    wait_for(lambda: len(proxy.requests("GET", "/x")) == 1, 10, what="the request at the proxy")
    assert not outcome, "answered while stalled"
    proxy.release()
    thread.join(30)
    assert not thread.is_alive() and isinstance(outcome[0], requests.ConnectionError), outcome
    with pytest.raises(requests.ReadTimeout):  # the second scripted stall: a new one, not released yet
        get(proxy, STALLED)
    proxy.release()
    assert get(proxy).text == "upstream"
