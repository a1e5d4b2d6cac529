"""Request counting for the benchmark: the tests' reverse proxy (``tests/fakes/fault_proxy.py``,
with no fault scripted) between the mount and Orthanc, its requests counted per method and path
shape (UIDs become ``{uid}``, Orthanc IDs ``{id}``).

Used only for the counting passes of the benchmark: timed passes talk to the server directly.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

from tests.fakes.fault_proxy import FaultProxy

_UID_SEGMENT = re.compile(r"^\d+(\.\d+)+$")
_ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def path_shape(path: str) -> str:
    """``/dicom-web/studies/1.2.3/series`` → ``/dicom-web/studies/{uid}/series`` (no query)."""
    segments = urlsplit(path).path.split("/")
    shaped = ["{uid}" if _UID_SEGMENT.match(s) else "{id}" if _ORTHANC_ID.match(s) else s for s in segments]
    return "/".join(shaped)


@dataclass(frozen=True)
class Counts:
    """What went through the proxy: requests per ``METHOD /path/shape``."""

    requests: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def __sub__(self, earlier: Counts) -> Counts:
        diff = Counter(self.requests)
        diff.subtract(earlier.requests)
        return Counts({k: v for k, v in sorted(diff.items()) if v})

    def summary(self) -> str:
        """``12 requests (1 GET /dicom-web/studies, ...)``, largest first."""
        parts = [f"{n} {shape}" for shape, n in sorted(self.requests.items(), key=lambda kv: (-kv[1], kv[0]))]
        return f"{self.total} requests" + (f" ({', '.join(parts)})" if parts else "")


class CountingProxy:
    """``with CountingProxy("http://127.0.0.1:8042") as proxy:`` then point a client at
    ``proxy.url`` (same paths) and read ``proxy.snapshot()``."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError("the proxy forwards to an http:// server")
        self._proxy = FaultProxy(upstream_url)

    @property
    def url(self) -> str:
        return self._proxy.url

    def start(self) -> CountingProxy:
        self._proxy.start()
        return self

    def snapshot(self) -> Counts:
        return Counts(dict(Counter(f"{s.method} {path_shape(s.path)}" for s in self._proxy.requests())))

    def stop(self) -> None:
        self._proxy.stop()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
