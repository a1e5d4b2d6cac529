"""STOW request bodies: how a file that cannot be read is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomfuse.stores.base import LocalReadError
from dicomfuse.stores.dicomweb import _read_exactly


def test_a_file_that_cannot_be_read_while_sent_is_this_computers_trouble(tmp_path: Path) -> None:
    """Not a refusal of the file (it went to failed/ for good): the write-back queue sends it
    again later."""
    with pytest.raises(LocalReadError, match="while sending it"):
        list(_read_exactly(tmp_path, 10))  # a folder: its read fails as with no descriptor left
