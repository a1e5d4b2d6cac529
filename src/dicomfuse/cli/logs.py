"""Logging: INFO and ERROR on the terminal; DEBUG, INFO and ERROR files, rotated."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILES = (("debug.log", logging.DEBUG), ("info.log", logging.INFO), ("error.log", logging.ERROR))


def default_log_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_log_dir("dicomfuse", appauthor=False))


def setup_logging(log_dir: Path | None, *, console_level: int = logging.INFO) -> Path:
    """Configure the root logger; return the folder of the log files."""
    folder = log_dir or default_log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(console)
    for name, level in FILES:
        handler = logging.handlers.RotatingFileHandler(
            folder / name, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
        )
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    # Libraries' request traces would repeat ours; they never carry headers, but keep them quiet.
    for noisy in ("urllib3", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # google-auth warns about each credential source it tried; our one line says what failed.
    logging.getLogger("google.auth").setLevel(logging.ERROR)
    logging.getLogger("mfusepy").setLevel(logging.INFO)
    return folder
