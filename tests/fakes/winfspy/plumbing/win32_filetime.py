"""FILETIME helpers of winfspy 0.8.4 (plumbing/win32_filetime.py): 100 ns units since 1601."""

import time
from datetime import datetime, timezone

EPOCH_AS_FILETIME = 116444736000000000  # 1970-01-01 as a FILETIME


def dt_to_filetime(dt: datetime) -> int:
    """A datetime (naive: UTC) as a FILETIME, to the millisecond like the real one."""
    if dt.tzinfo is None or dt.tzinfo.utcoffset(dt) is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return EPOCH_AS_FILETIME + 10 * int(dt.timestamp() * 1_000_000)


def filetime_to_dt(ft: int) -> datetime:
    return datetime.fromtimestamp((ft - EPOCH_AS_FILETIME) // 10 / 1_000_000, timezone.utc)


def filetime_now() -> int:
    return time.time_ns() // 100 + EPOCH_AS_FILETIME
