"""``dicomfuse``: mount a dataset (the original's flags), or ``dicomfuse demo`` for a local one."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dicomfuse import __version__
from dicomfuse.cli.settings import Settings
from dicomfuse.core.privacy import HIDDEN

log = logging.getLogger("dicomfuse")

PROG = "dicomfuse"
EXIT_USAGE = 2
EXIT_FAILURE = 1
PROBE_UID = "2.25.0"  # a valid UID no real study has: looking it up costs one small request


class UsageError(Exception):
    """Bad input on the command line: one line, exit code 2."""


def build_parser(prog: str = PROG, *, demo: bool = False) -> argparse.ArgumentParser:
    """An argparse parser generated from :class:`Settings` (each option declared once)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=("Mount a local demo dataset of generated DICOM studies." if demo else
                     "Mount a Cloud Healthcare API dataset, a DICOMweb server or a folder of DICOM "
                     "files as folders: store / study / series / <SOPInstanceUID>.dcm."),
        epilog="Stop with Ctrl+C: the mount is removed and its cache wiped. "
               "Subcommands: 'dicomfuse demo' mounts a local demo dataset; 'dicomfuse prefetch PATH' "
               "warms the cache of a folder; 'dicomfuse status' reports uploads in progress or failed; "
               "'dicomfuse retry -a ADDRESS' sends failed uploads again.",
        add_help=False,
    )
    groups: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra or {}
        assert isinstance(extra, dict)
        if demo and name == "datasetAddr":
            continue
        group = groups.setdefault(str(extra["group"]), parser.add_argument_group(str(extra["group"])))
        flags = [f"--{name}"] + ([str(extra["short"])] if "short" in extra else [])
        kwargs: dict[str, Any] = {"dest": name, "metavar": extra.get("metavar"), "default": None}
        help_text = field.description or ""
        if field.is_required() and not demo:
            kwargs["required"] = True
            help_text += " (required)"
        elif field.default is not None and not field.is_required():
            default = field.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default).lower()
            help_text += f" Default: {shown}."
        if name == "enableDeletion":
            kwargs.update(nargs="?", const="true")
        group.add_argument(*flags, help=help_text, **kwargs)
    misc = parser.add_argument_group("Other")
    misc.add_argument("-h", "--help", action="help", help="Print this help and exit.")
    misc.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_settings(argv: list[str], *, demo: bool = False, **overrides: Any) -> Settings:
    return parse_settings_with(argv, demo=demo, **overrides)[0]


def parse_settings_with(
    argv: list[str],
    *,
    demo: bool = False,
    prog: str | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    **overrides: Any,
) -> tuple[Settings, argparse.Namespace]:
    """Settings from the mount flags, plus the values of arguments a subcommand adds."""
    parser = build_parser(prog or (f"{PROG} demo" if demo else PROG), demo=demo)
    extra_dests: set[str] = set()
    if add_arguments is not None:
        before = {a.dest for a in parser._actions}
        add_arguments(parser)
        extra_dests = {a.dest for a in parser._actions} - before

    def fail(message: str) -> None:
        raise UsageError(message)

    parser.error = fail  # type: ignore[method-assign]
    _refuse_unknown_options(parser, argv)
    ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if v is not None and k not in extra_dests}
    values.update({k: v for k, v in overrides.items() if k not in values or k == "datasetAddr"})
    try:
        return Settings(**values), ns
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"] if isinstance(x, str)) or "options"
        msg = err["msg"].removeprefix("Value error, ")
        raise UsageError(f"--{where}: {msg}") from None


def _is_healthcare(dataset: object) -> bool:
    from dicomfuse.stores.healthcare import HealthcareDataset

    return isinstance(dataset, HealthcareDataset)


def _root_hint(address: str) -> str:
    """For a server address with no path (http://host:8042), where the DICOMweb root is missing."""
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme in ("http", "https") and parts.path.strip("/") == "":
        return f" (is the DICOMweb root missing from the address? Orthanc's is {address.rstrip('/')}/dicom-web)"
    return ""


def _probe(store: object) -> None:
    """One small request that fails unless the store's address serves DICOMweb: a store-wide
    search for one study. (A lookup of one UID would not do: its 404 means "no such study" to
    a server that answers so, and a mistyped root, /dicomweb for /dicom-web, mounted as an
    empty store.) A store without such a search looks one UID up."""
    has_studies = getattr(store, "has_studies", None)
    if callable(has_studies):
        has_studies()
    else:
        next(iter(store.studies(PROBE_UID)), None)  # type: ignore[attr-defined]


def _login_hint(address: str, dataset: object, exc: Exception) -> str:
    """For a DICOMweb server that answered 401: how to give it a login, or that the one given
    was refused. (A Cloud Healthcare dataset's refusals name the role or the credentials.)"""
    from urllib.parse import urlsplit, urlunsplit

    from dicomfuse.stores.dicomweb import DicomwebDataset
    from dicomfuse.stores.open import has_login

    if not isinstance(dataset, DicomwebDataset) or getattr(exc, "status", None) != 401:
        return ""
    if has_login(address):
        return " (the server refused the user name and password given in the address)"
    parts = urlsplit(address.strip())
    host = parts.hostname or dataset.name
    with_login = urlunsplit(parts._replace(netloc=f"USER:PASSWORD@{parts.netloc}"))
    return (f" (the server asks for a login: put it in ~/.netrc as 'machine {host} login USER password PASSWORD', "
            f"or in the address: {with_login}; if ~/.netrc has one for {host}, the server refused it)")


def _refuse_unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An option mistyped is named first, with the option meant: argparse would say that a
    required one is missing (--datsetAddr: "the following arguments are required:
    --datasetAddr"), and never mention the typo."""
    required = [a for a in parser._actions if a.required]
    for action in required:
        action.required = False
    try:
        _, unknown = parser.parse_known_args(argv)
    finally:
        for action in required:
            action.required = True
    if not unknown:
        return
    import difflib

    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    hints = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1) if arg.startswith("--") else []
        hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    raise UsageError(f"unrecognized arguments: {' '.join(hints)}")


def check_mount_path(path: Path, platform: str = sys.platform) -> str:
    """The mount point to hand the adapter, or UsageError. Windows: a free drive letter (J:) or
    a folder path that is new or empty (backends.windows.check_mount_point). Elsewhere: an
    existing empty folder."""
    if platform == "win32":
        from dicomfuse.backends import windows

        try:
            return windows.check_mount_point(str(path))
        except ValueError as exc:
            raise UsageError(f"--mountPath: {exc}") from None
    _clear_dead_mount(path)
    if os.path.ismount(path):
        raise UsageError(f"--mountPath: {path} is already a mount point")
    if not path.exists():
        raise UsageError(f"--mountPath: {path} does not exist (create an empty folder first)")
    if not path.is_dir():
        raise UsageError(f"--mountPath: {path} is not a folder")
    if any(path.iterdir()):
        raise UsageError(f"--mountPath: {path} is not empty")
    return str(path)


def _clear_dead_mount(path: Path) -> None:
    """A mount whose process died (kill -9, a crash) leaves its folder answering "Transport
    endpoint is not connected": unmount it so the new mount can take its place."""
    try:
        os.statvfs(path)  # reaches the file system (a stat may be answered from cached attributes)
        return
    except OSError as exc:
        # Linux says "transport endpoint is not connected"; a dead macFUSE mount "device not configured"
        if exc.errno not in (errno.ENOTCONN, errno.ENXIO):
            return
    import shutil
    import subprocess

    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-uz", str(path)] if tool and sys.platform != "darwin" else ["umount", "-f", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise UsageError(f"--mountPath: {path} is a mount whose process died (transport endpoint is not "
                         f"connected) and it could not be unmounted: {result.stderr.strip()}")
    log.warning("The earlier mount at %s had stopped without unmounting (transport endpoint is not "
                "connected); it was unmounted", path)


def claim_mount_point(path: str, platform: str = sys.platform) -> int:
    """Linux and macOS: an flock on the mount point folder, held by the start that mounts there
    for the mount's life (return the fd, to close at the end; -1 on Windows, where the mount
    point itself is taken when WinFsp makes it). check_mount_path ran long before the mount: two
    starts at the same moment (a service started twice, a retry loop) both passed it and both
    mounted, stacked, the first hidden and still running. The fd is opened before anything is
    mounted there, so it is the folder underneath; once it is held, the folder is checked again
    (a start that finished mounting meanwhile: its mount is found)."""
    if platform == "win32":
        return -1
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise UsageError(f"--mountPath: cannot open {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--mountPath: another dicomfuse is mounting on {path}") from None
        except OSError as exc:  # a file system without flock: mount as before
            log.debug("Cannot lock the mount point %s (%s): not guarded against a second start",
                      path, exc.strerror or exc)
        if os.path.ismount(path):
            raise UsageError(f"--mountPath: {path} is already a mount point")
        if os.listdir(path):
            raise UsageError(f"--mountPath: {path} is not empty")
    except BaseException:
        os.close(fd)
        raise
    return fd


def mount(settings: Settings, on_mounted: Callable[[], None] | None = None) -> int:
    """Open the dataset, check it answers, mount in the foreground; clean up on exit.
    ``on_mounted`` runs on its own thread once the mount is up."""
    mount_point = check_mount_path(settings.mountPath)
    claim = claim_mount_point(mount_point)
    try:
        return _mount_at(mount_point, settings, on_mounted)
    finally:
        if claim >= 0:
            os.close(claim)


def _mount_at(mount_point: str, settings: Settings, on_mounted: Callable[[], None] | None) -> int:
    from dicomfuse.backends import adapter_name, options
    from dicomfuse.core.vfs import Vfs, VfsConfig
    from dicomfuse.core.workdirs import FolderError, WorkDirs, folder_problem
    from dicomfuse.core.writeback import QueueBusy, dataset_label
    from dicomfuse.stores.auth import CredentialsError
    from dicomfuse.stores.base import Forbidden, NotFound, StoreError, Unavailable, lists_sizes
    from dicomfuse.stores.open import open_dataset, without_login

    try:
        dataset = open_dataset(settings.datasetAddr, key_file=settings.keyFile, orthanc_rest=settings.orthancRest,
                               pool_size=settings.downloadThreads + 4, timeout=settings.httpTimeout,
                               ca_bundle=settings.caBundle)
    except ValueError as exc:
        raise UsageError(f"--datasetAddr: {exc}") from None
    except CredentialsError as exc:
        log.error("Cannot authenticate: %s", exc)
        return EXIT_FAILURE
    if settings.keyFile is not None and not _is_healthcare(dataset):
        log.warning("--keyFile is not used: %s is not a Cloud Healthcare API dataset address (.../v1/projects/P/"
                    "locations/L/datasets/D); a DICOMweb server or folder is reached without it",
                    without_login(settings.datasetAddr))
    try:
        stores = list(dataset.list_stores())
        if stores:  # one small query proves the server answers before anything is mounted
            _probe(dataset.open_store(stores[0]))
    except Forbidden as exc:  # a 403 names the role the identity needs (the store adds it)
        log.error("Access to the dataset was refused: %s%s", exc, _login_hint(settings.datasetAddr, dataset, exc))
        dataset.close()
        return EXIT_FAILURE
    except NotFound as exc:
        if _is_healthcare(dataset):
            log.error("The dataset was not found (check the project, location and dataset names): %s", exc)
        else:
            log.error("No DICOMweb service at this address: %s (check its DICOMweb root: Orthanc's is "
                      "http://HOST:8042/dicom-web, dcm4chee's http://HOST:8080/dcm4chee-arc/aets/AET/rs)%s", exc,
                      _root_hint(without_login(settings.datasetAddr)))
        dataset.close()
        return EXIT_FAILURE
    except StoreError as exc:
        if exc.status is not None and not isinstance(exc, Unavailable):  # it answered: a 4xx
            log.error("The server refused the start-up search: %s%s", exc,
                      _root_hint(without_login(settings.datasetAddr)))
        else:
            log.error("Cannot reach the dataset: %s", exc)
        dataset.close()
        return EXIT_FAILURE
    log.info("Dataset %s has %d store(s)", dataset.name, len(stores))
    cache_root = settings.cacheDir or default_cache_dir()
    for own in (mount_point, cache_root):
        HIDDEN.keep_shown(own)
    try:
        workdirs = WorkDirs(cache_root)
    except (FolderError, OSError) as exc:
        dataset.close()
        why = str(exc) if isinstance(exc, FolderError) else folder_problem(cache_root, exc)
        raise UsageError(f"--cacheDir: {why}") from None
    config = VfsConfig(
        listing_ttl=settings.cacheTime[0],
        instance_ttl=settings.cacheTime[1],
        cache_bytes=settings.cache_bytes,
        deletion_enabled=settings.enableDeletion,
        download_workers=settings.downloadThreads,
        read_ahead=settings.readAhead,
        upload_mode=settings.uploadMode,
        dataset_label=dataset_label(settings.datasetAddr),
    )
    try:
        vfs = Vfs(dataset, config, workdirs)
    except QueueBusy:
        dataset.close()
        workdirs.wipe()
        # The holder is a write-back mount, or a mount of either mode sending the uploads an
        # earlier one left (it holds the queue until it ends).
        raise UsageError(f"--uploadMode writeback: another running mount holds the write-back queue of the cache "
                         f"folder {workdirs.root} (a write-back mount, or one sending uploads an earlier mount "
                         "left); give this one its own --cacheDir, or stop that mount first") from None
    except FolderError as exc:  # the write-back queue's folders (spool/writeback) are checked too
        dataset.close()
        workdirs.wipe()
        raise UsageError(f"--cacheDir: {exc}") from None
    mount_options = options.merge(
        options.default_options(volume_name=dataset.name, sizes_listed=lists_sizes(dataset)),
        options.parse_extra(settings.extraMountOptions),
    )
    name = adapter_name()
    try:
        if name == "winfsp":
            from dicomfuse.backends import winfsp as adapter
        else:
            from dicomfuse.backends import fuse as adapter  # type: ignore[no-redef]
    except (ImportError, OSError, AttributeError) as exc:  # the binding could not load its library
        log.error("FUSE is not installed or could not be loaded (%s): install %s", exc, FUSE_HINT)
        vfs.shutdown()
        return EXIT_FAILURE
    # WinFsp makes its mount folder itself: an empty one is removed for the mount's life (the
    # winfsp adapter does it itself; WinFsp's FUSE layer needs it done here).
    if sys.platform == "win32" and name == "fuse":
        from dicomfuse.backends import windows

        refolder = windows.free_mount_folder(mount_point)
    else:
        refolder = False
    log.info("Mounting %s at %s (Ctrl+C to unmount)", dataset.name, mount_point)
    if on_mounted is not None:
        _after_mount(mount_point, on_mounted)
    _SHUTDOWN.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        # Ctrl+C before the mount is up, as Python's own handler; once the mount is gone, a note.
        # (The FUSE loop puts libfuse's handlers in place of this one while it runs.)
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        adapter.run(vfs, mount_point, mount_options, on_stop=_ignore_interrupts)
    except RuntimeError as exc:
        if settings.extraMountOptions:
            log.error("The mount failed (%s): libfuse refused it (its words are above); check --extraMountOptions "
                      "%s", exc, settings.extraMountOptions)
        else:
            log.error("The mount failed (%s); is FUSE installed and %s free?", exc, settings.mountPath)
        return EXIT_FAILURE
    finally:
        _ignore_interrupts()
        vfs.shutdown()
        if refolder:
            os.makedirs(mount_point, exist_ok=True)
        if main_thread:  # the shutdown is done and the program ends: a late Ctrl+C changes nothing
            for sig in _STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
    log.info("Unmounted %s; cache wiped", settings.mountPath)
    return 0


FUSE_HINT = {"linux": "fuse3 (sudo apt install fuse3)", "darwin": "macFUSE (https://macfuse.github.io)",
             "win32": "WinFsp (https://winfsp.dev)"}.get(sys.platform, "FUSE")


_SHUTDOWN = threading.Event()  # the mount is gone: the shutdown (uploads, cache wipe) runs
_said_at = [0.0]


def _on_interrupt(signum: int, frame: object) -> None:
    if not _SHUTDOWN.is_set():
        raise KeyboardInterrupt
    now = time.monotonic()
    if now - _said_at[0] >= 2.0:
        _said_at[0] = now
        log.warning("Still unmounting: finishing the uploads in flight, then wiping the cache (this ends by "
                    "itself, within a minute)")


# Signals that end the process by default and that libfuse handles while the mount runs. SIGHUP:
# the terminal closed or the SSH session dropped during the (up to a minute) shutdown.
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _ignore_interrupts() -> None:
    """Once the mount is gone, finish the shutdown (uploads in flight, the cache wipe) whatever
    Ctrl+C, SIGTERM or SIGHUP comes next: each one gets a note. A terminal's Ctrl+C reaches a
    single-file build twice (its bootloader forwards its own copy), a user presses it again, a
    service manager sends SIGTERM, the terminal is closed or the SSH session drops (SIGHUP): any
    of them would cut the shutdown short and leave patient data in the cache. Called by the
    adapter as soon as the mount is gone (libfuse has just given these signals back their
    default action, which ends the process at once), and again after."""
    if not _SHUTDOWN.is_set():
        log.debug("The mount is gone: finishing the shutdown")
    _SHUTDOWN.set()
    if threading.current_thread() is threading.main_thread():
        for sig in _STOP_SIGNALS:
            signal.signal(sig, _on_interrupt)


def is_mounted(mount_point: str | Path) -> bool:
    """Whether the mount is up: a mount point on Linux and macOS; on Windows a drive letter
    that answers, or the folder WinFsp turned into a mount point (a reparse point)."""
    text = str(mount_point)
    if sys.platform == "win32" and len(text) == 2 and text[1] == ":":
        return os.path.isdir(text + "\\")
    return os.path.ismount(text)


def _after_mount(path: str, action: Callable[[], None], timeout: float = 60.0) -> None:
    def wait_then_run() -> None:
        deadline = time.monotonic() + timeout
        while not is_mounted(path):
            if time.monotonic() > deadline:
                log.error("The mount did not appear within %.0f s", timeout)
                return
            time.sleep(0.05)
        try:
            action()
        except Exception:  # noqa: BLE001 - a failed warm-up must not take the mount down
            log.exception("Action after mounting failed")

    threading.Thread(target=wait_then_run, name="after-mount", daemon=True).start()


def default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("dicomfuse", appauthor=False))


def default_demo_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("dicomfuse", appauthor=False)) / "demo-dataset"


def run_demo(argv: list[str]) -> int:
    from dicomfuse.demo import ensure_demo_dataset

    default_mount = Path.home() / "dicomfuse-demo"
    has_mount = any(a.startswith(("--mountPath", "-p")) for a in argv)
    root = ensure_demo_dataset(default_demo_dir())
    settings = parse_settings(argv, demo=True, datasetAddr=str(root),
                              **({} if has_mount else {"mountPath": default_mount}))
    if sys.platform != "win32":
        _clear_dead_mount(settings.mountPath)  # the last demo was killed: its folder answers ENOTCONN
    try:
        settings.mountPath.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--mountPath: cannot make {settings.mountPath}: {exc.strerror or exc}") from None
    print(f"Demo dataset: {root}\nMounting at {settings.mountPath}; try: ls -R {settings.mountPath}",
          file=sys.stderr)
    return mount(settings)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in ("prefetch", "status", "retry"):
            _setup_logging(_peek_log_dir(args[1:]))
            if args[0] == "retry":
                from dicomfuse.cli.retry import run_retry

                return run_retry(args[1:])
            if args[0] == "prefetch":
                from dicomfuse.cli.prefetch import run_prefetch

                return run_prefetch(args[1:])
            from dicomfuse.cli.status import run_status

            return run_status(args[1:])
        if args and not args[0].startswith("-") and args[0] != "demo":
            print(f"dicomfuse: unknown command {args[0]!r}: the commands are demo, prefetch, status and retry; "
                  "to mount, give -a ADDRESS -p PATH (see dicomfuse --help)", file=sys.stderr)
            return 2
        if args and args[0] == "demo":
            settings_argv = args[1:]
            _setup_logging(_peek_log_dir(settings_argv))
            return run_demo(settings_argv)
        settings = parse_settings(args)
        folder = _setup_logging(settings.logDir)
        HIDDEN.keep_shown(folder)
        log.debug("Log files in %s", folder)
        return mount(settings)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, or a library failing on an answer: one line, never a traceback
        from dicomfuse.tracebacks import format_without_messages

        log.error("dicomfuse stopped on an unexpected %s (its message is not shown: it may quote patient data; "
                  "the stack is in the debug log)", type(exc).__name__)
        log.debug("The stack of that %s:\n%s", type(exc).__name__, format_without_messages(exc))
        return 1


def _setup_logging(log_dir: Path | None) -> Path:
    """Logging to ``log_dir`` (default: the user log folder); a folder that cannot be used is a
    usage error of --logDir (one line), not a traceback."""
    from dicomfuse.cli.logs import setup_logging
    from dicomfuse.core.workdirs import FolderError

    try:
        return setup_logging(log_dir)
    except FolderError as exc:
        raise UsageError(f"--logDir: {exc}") from None


def _peek_log_dir(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--logDir="):
            return Path(arg.split("=", 1)[1])
        if arg == "--logDir" and i + 1 < len(argv):
            return Path(argv[i + 1])
    return None


def entry() -> None:
    sys.exit(main())
