"""The demo dataset: a local folder with a store of synthetic studies and an empty one.

``dicomfuse demo`` mounts it, so a first run needs no server. The sample files are generated
(``dicomfuse.samples``) and stored through :class:`LocalStore` so the layout is the canonical
``<store>/<Study>/<Series>/<SOP>.dcm``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from dicomfuse.core.workdirs import make_parents
from dicomfuse.samples import write_samples
from dicomfuse.stores.local import LocalDataset

log = logging.getLogger(__name__)

DEMO_STORE = "demo-store"
SCRATCH_STORE = "scratch"


def ensure_demo_dataset(root: Path) -> Path:
    """Create the demo dataset at ``root`` if it is absent or an empty folder, and return
    ``root``. A non-empty ``root`` is left as it is (idempotent). The dataset is built in a
    hidden sibling folder and renamed into place, so an interrupted run leaves no half dataset
    and concurrent runs do not mix."""
    root = Path(root)
    if _is_non_empty_folder(root):
        return root
    make_parents(root)  # ~/.local/share: 0700 as the XDG spec asks, not 0777 under umask 000
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _build_demo_dataset(staging)
        _move_into_place(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _is_non_empty_folder(root: Path) -> bool:
    if not root.exists():
        return False
    if not root.is_dir():
        raise NotADirectoryError(f"demo dataset path {str(root)!r} is not a folder")
    return any(root.iterdir())


def _build_demo_dataset(folder: Path) -> None:
    dataset = LocalDataset(folder)
    dataset.create_store(DEMO_STORE)
    dataset.create_store(SCRATCH_STORE)
    with tempfile.TemporaryDirectory(prefix="dicomfuse-samples-") as samples_dir:
        samples = write_samples(Path(samples_dir))
        outcomes = dataset.open_store(DEMO_STORE).store_files([s.path for s in samples])
    refused = [o for o in outcomes if not o.stored]
    if refused:
        raise RuntimeError(f"demo sample {refused[0].path.name} was refused: {refused[0].reason}")
    log.debug("built demo dataset with %d sample instance(s)", len(outcomes))


def _move_into_place(staging: Path, root: Path) -> None:
    """Rename ``staging`` to ``root``; if another run got there first, keep its dataset."""
    try:
        if root.is_dir():
            root.rmdir()  # empty (checked by the caller); fails if it filled meanwhile
        os.rename(staging, root)
    except OSError:
        if not _is_non_empty_folder(root):
            raise
        log.debug("demo dataset %s was created concurrently; keeping it", root)
        return
    log.info("created the demo dataset in %s", root)
