"""``dicomfuse status``: what is waiting to be uploaded and what failed, read from the cache
folder without touching it, so it works while a mount runs, after it stopped and after a crash.

Sources: the write-back queue's records (``spool/writeback``; see
:mod:`dicomfuse.core.writeback`), its ``status.json`` snapshot (is a live mount sending them?),
the failed uploads of both modes (``spool/writeback/failed`` with reasons, ``spool/failed``
for synchronous uploads, with a sidecar ``<file>.json`` giving the store and reason; older ones
have none and their reason is in the error log), and the spool files a mount that stopped (a
crash, ``kill -9``) left in ``spool``: synchronous uploads the server never confirmed, which the
next mount moves to ``spool/failed`` (a running mount's own spool files are not listed). Files are
named by UIDs, generated IDs or the user's file names, so nothing here is patient data.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomfuse.core.uploads import files_in, is_sidecar, orphan_files, pid_alive, read_sidecar
from dicomfuse.core.writeback import (
    DATA_SUFFIX,
    FAILED_DIR,
    QueuedUpload,
    dataset_label,
    queue_dir,
    read_record,
    read_status,
    record_paths,
    same_dataset,
)
from dicomfuse.stores.http import hide_path_tokens

EXIT_CLEAN = 0
EXIT_FAILED = 1
EXIT_PENDING = 3
SYNC_FAILED_DIR = ("spool", "failed")
SPOOL_DIR = "spool"
ORPHAN_NOTE = "not confirmed uploaded; dicomfuse retry sends it"
EXIT_UNUSABLE = 2  # the cache folder is not a folder, or this user cannot read it
HELP_EXIT_CODES = ("Exit code: 0 nothing pending or failed; 1 some uploads failed or were left unconfirmed by a "
                   "mount that stopped; 2 the cache folder is not a folder or cannot be read by this user; "
                   "3 uploads pending (none failed).")
STALE_GRACE = 5.0  # seconds beyond three missed heartbeats before a mount counts as gone


@dataclass(frozen=True)
class FailedFile:
    name: str
    size: int
    path: Path
    reason: str | None


def status_report(cache_root: Path) -> tuple[str, int]:
    """The report on ``cache_root`` as plain text, and the exit code: 0 nothing pending or
    failed, 1 something failed or was left unconfirmed by a mount that stopped (it needs the
    user: it is never sent by itself), 3 uploads pending (none failed)."""
    now = time.time()
    queue = queue_dir(cache_root)
    pending = _pending(queue)
    failed = _failed_writeback(queue / FAILED_DIR) + _failed_sync(cache_root.joinpath(*SYNC_FAILED_DIR))
    orphans = _orphans(cache_root / SPOOL_DIR)
    lines = [f"DICOMFuse uploads in {cache_root}", ""]
    if pending:
        lines.extend(_pending_lines(pending, read_status(queue), now))
    else:
        lines.append("Write-back queue: nothing waiting to be uploaded.")
    lines.append("")
    if failed:
        lines.extend(_failed_lines(failed))
    else:
        lines.append("Failed uploads: none.")
    if orphans:
        lines.append("")
        lines.extend(_orphan_lines(orphans, cache_root.joinpath(*SYNC_FAILED_DIR)))
    code = EXIT_FAILED if failed or orphans else EXIT_PENDING if pending else EXIT_CLEAN
    return "\n".join(lines) + "\n", code


def run_status(argv: list[str]) -> int:
    """``dicomfuse status [--cacheDir DIR]``: print the report, return its exit code."""
    from dicomfuse.cli.main import default_cache_dir

    parser = argparse.ArgumentParser(
        prog="dicomfuse status",
        description="Show uploads waiting in the write-back queue, uploads that failed, and uploads a mount "
                    "that stopped (a crash, kill -9) left unconfirmed. " + HELP_EXIT_CODES,
    )
    parser.add_argument("--cacheDir", metavar="DIR", type=Path, default=None,
                        help="The mount's --cacheDir (default: the user cache folder).")
    parser.add_argument("--logDir", metavar="DIR", type=Path, default=None,
                        help="Folder of the log files (as for the mount).")
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    root = ns.cacheDir or default_cache_dir()
    if ns.cacheDir is not None and not root.is_dir():
        # A mistyped folder must not read as "nothing pending, nothing failed".
        print(f"dicomfuse status: {root} is not a folder (give the mount's --cacheDir)", file=sys.stderr)
        return EXIT_UNUSABLE
    problem = unreadable(root)
    if problem is not None:
        print(f"dicomfuse status: {problem}", file=sys.stderr)
        return EXIT_UNUSABLE
    text, code = status_report(root)
    print(text, end="")
    return code


# ---------------------------------------------------------------------------------------------
# reading


def unreadable(cache_root: Path) -> str | None:
    """Why this user cannot read the folders of ``cache_root`` that status and retry read, in
    one line, or None when it can (a folder that does not exist holds nothing: fine). The
    readers below take an unreadable folder for an empty one: a user other than the mount's
    (an admin, a monitoring check) would be told "nothing pending, nothing failed"."""
    hint = "(run as the user the mount runs as)"
    if cache_root.is_dir() and not os.access(cache_root, os.X_OK):  # name the folder that stops it
        return f"cannot read {cache_root}: {os.strerror(errno.EACCES)} {hint}"
    spool = cache_root / SPOOL_DIR
    queue = queue_dir(cache_root)
    for folder in (spool, cache_root.joinpath(*SYNC_FAILED_DIR), queue, queue / FAILED_DIR):
        try:
            os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            return f"cannot read {folder}: {exc.strerror or exc} {hint}"
    return None


def _pending(queue: Path) -> list[QueuedUpload]:
    """Records with their bytes present (a live mount may remove either meanwhile)."""
    items = []
    for record in record_paths(queue):
        item = read_record(record, strict=False)
        if item is not None and item.path.is_file():
            items.append(item)
    return items


def _failed_writeback(folder: Path) -> list[FailedFile]:
    out: list[FailedFile] = []
    for path in files_in(folder):
        if not path.name.endswith(DATA_SUFFIX):
            continue
        record = read_record(path.with_name(path.name[: -len(DATA_SUFFIX)] + ".json"), strict=False)
        name = record.display if record is not None else path.name
        out.append(FailedFile(name, _size(path), path, record.last_error if record is not None else None))
    return out


def _failed_sync(folder: Path) -> list[FailedFile]:
    out: list[FailedFile] = []
    for path in files_in(folder):
        if is_sidecar(path):
            continue
        info = read_sidecar(path)
        if info is None:
            out.append(FailedFile(path.name, _size(path), path, None))
            continue
        name = f"{path.name} (store {info.store})" if info.store else f"{path.name} (store unknown)"
        out.append(FailedFile(name, _size(path), path, info.reason))
    return out


def _orphans(spool: Path) -> list[FailedFile]:
    """Spool files of mounts that stopped before the server confirmed them (empty ones are no
    upload: the next mount deletes them)."""
    out = []
    for path in orphan_files(spool):
        size = _size(path)
        if size > 0:
            out.append(FailedFile(path.name, size, path, ORPHAN_NOTE))
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# text


def _pending_lines(pending: list[QueuedUpload], snapshot: dict[str, Any] | None, now: float) -> list[str]:
    total = sum(i.size for i in pending)
    oldest = min(i.queued_at for i in pending)
    lines = [f"Write-back queue: {_count(len(pending), 'upload')} pending, {_bytes(total)}, "
             f"oldest queued {_age(now - oldest)} ago"]
    per_store: dict[tuple[str | None, str], list[QueuedUpload]] = defaultdict(list)
    for item in pending:
        per_store[(dataset_label(item.dataset), item.store)].append(item)  # one dataset however spelt
    for (dataset, store), items in sorted(per_store.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        where = f"store {store}" + (f" of {hide_path_tokens(dataset)}" if dataset else "")
        lines.append(f"  {where}: {_count(len(items), 'upload')}, {_bytes(sum(i.size for i in items))}")
    # The status snapshot is of the last mount that held the queue: it says nothing of uploads
    # of another dataset (that mount keeps them for their own dataset's next mount).
    running = snapshot.get("dataset") if snapshot is not None else None
    others = [i for i in pending if running and not same_dataset(i.dataset, running)]
    if len(others) < len(pending):
        lines.append(_liveness(snapshot, now))
        if snapshot is not None and snapshot.get("last_error"):
            lines.append(f"  Last error: {snapshot['last_error']}")
    if others:
        which = "" if len(others) == len(pending) else f"{_count(len(others), 'upload')} of another dataset: "
        lines.append(f"  {which}{WAITING}")
    return lines


WAITING = ("No running mount is sending them: they are sent when the dataset is mounted again with the same "
           "--cacheDir (in either upload mode).")


def _liveness(snapshot: dict[str, Any] | None, now: float) -> str:
    waiting = "  " + WAITING
    if snapshot is None or not snapshot.get("running"):
        return waiting
    try:
        pid = int(snapshot["pid"])
        updated = float(snapshot["updated_at"])
        heartbeat = float(snapshot.get("heartbeat") or 10.0)
    except (KeyError, TypeError, ValueError):
        return waiting
    if not pid_alive(pid):
        return waiting
    age = max(0.0, now - updated)
    if age > 3 * heartbeat + STALE_GRACE:
        return (f"  The mount (pid {pid}) has not reported for {_age(age)}; it may be stuck. If it is "
                "gone, the uploads are sent when the dataset is mounted again with the same --cacheDir "
                "(in either upload mode).")
    in_flight = int(snapshot.get("in_flight") or 0)
    return (f"  A running mount (pid {pid}) is sending them: {in_flight} being sent now; "
            f"status updated {_age(age)} ago.")


def _failed_lines(failed: list[FailedFile]) -> list[str]:
    lines = [f"Failed uploads: {len(failed)}. Their bytes are kept; send them again with "
             "'dicomfuse retry -a ADDRESS' (the dataset's address; add --store NAME for files of unknown "
             "store), or copy a file into the mount again; delete a file when it is no longer needed."]
    for f in failed:
        reason = f.reason or "reason in the error log"
        lines.append(f"  {f.name}  {_bytes(f.size)}  ({reason})")
        lines.append(f"    {f.path}")
    return lines


def _orphan_lines(orphans: list[FailedFile], failed_dir: Path) -> list[str]:
    lines = [f"Unconfirmed uploads left by a mount that stopped: {len(orphans)}. The server may not have "
             "them; 'dicomfuse retry -a ADDRESS --store NAME' sends them (the next mount of any dataset with "
             f"this --cacheDir moves them to {failed_dir} for it). Keep your copies until then."]
    for f in orphans:
        lines.append(f"  {f.path}  {_bytes(f.size)}  ({f.reason})")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _bytes(n: int) -> str:
    if n < 1024:
        return "1 byte" if n == 1 else f"{n} bytes"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}"


def _age(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 120:
        return f"{s} s"
    if s < 2 * 3600:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s // 3600} h"
    return f"{s // 86400} days"


