"""packaging/'s tests run outside the fast suite and borrow the suite's stand-ins (tests/fakes): put the
repository root on sys.path however pytest was started (``pytest packaging`` or ``python -m pytest``)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
