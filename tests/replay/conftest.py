"""Replays of what Finder and Explorer do, against the adapters with only the native binding
replaced: a real core (Vfs) over a real server, outcomes checked at the server.

``replayed`` gives a started :class:`Vfs` opened on one of the shared backends (the local store,
a real Orthanc, the Cloud Healthcare stand-in) and the :class:`Backend` to check the server with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomfuse.core.vfs import Vfs, VfsConfig
from dicomfuse.core.workdirs import WorkDirs
from dicomfuse.stores.open import open_dataset
from tests.conftest import Backend, _local_backend, _orthanc_backend, google_backend


@dataclass
class Replayed:
    vfs: Vfs
    backend: Backend


@pytest.fixture(params=["local", "orthanc", "google"])
def replayed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Replayed]:
    if request.param == "local":
        backend = _local_backend(tmp_path / "dataset")
    elif request.param == "google":
        backend = google_backend(request.getfixturevalue("healthcare"), tmp_path)
    else:
        backend = _orthanc_backend(request.getfixturevalue("orthanc"))
    dataset = open_dataset(backend.address, key_file=backend.key_file)
    vfs = Vfs(dataset, VfsConfig(listing_ttl=60.0), WorkDirs(tmp_path / "work"))
    vfs.start()
    try:
        yield Replayed(vfs, backend)
    finally:
        vfs.shutdown()
        dataset.close()
