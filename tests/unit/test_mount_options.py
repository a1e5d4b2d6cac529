"""The default mount options of each OS, pinned with the reason for each, and what mfusepy hands
to the libfuse it drives.

Sources: the macFUSE wiki "Mount Options" (same text as fuse4x.github.io/options.html), libfuse's
fuse_lib_opts/fuse_mount_opts, WinFsp's src/dll/fuse/fuse.c (fsp_fuse_core_opts), and the options
of the tool DICOMFuse replaces: -onegative_timeout=4 -onolocalcaches -onoappledouble
-odefer_permissions -ovolname=DICOMFuse.
"""

from __future__ import annotations

import logging
import types

import pytest

from dicomfuse.backends import options

try:
    import mfusepy as _mfusepy

    LIBFUSE_MAJOR: int | None = _mfusepy.fuse_version_major
except (ImportError, OSError, AttributeError):  # no libfuse here: the option tables still run
    LIBFUSE_MAJOR = None

ORIGINAL_MACOS = {"negative_timeout": "4", "nolocalcaches": True, "noappledouble": True,
                  "defer_permissions": True, "volname": "DICOMFuse"}

# Options macFUSE documents (wiki "Mount Options") plus libfuse 2's high-level ones it also takes.
MACFUSE_KNOWN = {
    "allow_other", "allow_recursion", "allow_root", "auto_cache", "auto_xattr", "daemon_timeout", "debug",
    "default_permissions", "defer_permissions", "direct_io", "extended_security", "fsid", "fsname",
    "fssubtype", "fstypename", "iosize", "jail_symlinks", "kill_on_unmount", "local", "modules",
    "negative_vncache", "noappledouble", "noapplexattr", "nobrowse", "nolocalcaches", "noubc",
    "novncache", "quiet", "rdonly", "volicon", "volname",
    "hard_remove", "use_ino", "readdir_ino", "kernel_cache", "umask", "uid", "gid", "entry_timeout",
    "negative_timeout", "attr_timeout", "ac_attr_timeout", "intr", "intr_signal",
}
# libfuse 3 on Linux: fuse_mount_opts and fuse_lib_opts. Anything else fails the mount with
# "fuse: unknown option(s)".
LIBFUSE3_KNOWN = {
    "allow_other", "allow_root", "auto_unmount", "default_permissions", "fsname", "subtype", "max_read",
    "blkdev", "blksize", "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime",
    "hard_remove", "use_ino", "readdir_ino", "direct_io", "kernel_cache", "auto_cache", "noauto_cache",
    "umask", "uid", "gid", "entry_timeout", "negative_timeout", "attr_timeout", "ac_attr_timeout",
    "noforget", "remember", "modules", "intr", "intr_signal", "max_idle_threads", "max_threads", "clone_fd",
}
MACOS_ONLY = {"volname", "noappledouble", "noapplexattr", "defer_permissions", "nolocalcaches", "local",
              "daemon_timeout", "iosize", "negative_vncache", "novncache", "noubc", "auto_xattr"}


def test_macos_defaults() -> None:
    mac = options.default_options("darwin")
    assert mac == {
        "fsname": "dicomfuse",
        "attr_timeout": "1",        # small, not zero (CONVENTIONS); moot under nolocalcaches
        "entry_timeout": "1",
        "negative_timeout": "1",
        "hard_remove": True,        # no .fuse_hidden* renames of open deleted files (macfuse#1163)
        "volname": "DICOMFuse",     # the name in Finder's sidebar, as the original tool's
        "noappledouble": True,      # original tool; the kernel refuses ._* and .DS_Store (the core
                                    # keeps them local anyway: FSKit and fuse-t ignore the option)
        "defer_permissions": True,  # original tool; the server decides, not the kernel's mode check
        "nolocalcaches": True,      # original tool; sizes learnt on first read show in Finder
    }
    assert set(mac) <= MACFUSE_KNOWN, "an option macFUSE does not know fails the mount"
    assert not {"local", "allow_other", "auto_xattr", "negative_vncache", "default_permissions"} & set(mac), (
        "local: Trash and Spotlight folders get created; allow_other: every user reads patient data; "
        "auto_xattr: xattrs go to ._ files; negative_vncache: remote changes go unseen; "
        "default_permissions contradicts defer_permissions")


def test_macos_defaults_keep_what_the_original_tool_set() -> None:
    mac = options.default_options("darwin")
    assert set(ORIGINAL_MACOS) <= set(mac)
    assert {k: mac[k] for k in ORIGINAL_MACOS if k != "negative_timeout"} == {
        k: v for k, v in ORIGINAL_MACOS.items() if k != "negative_timeout"}
    assert float(mac["negative_timeout"]) > 0  # shorter than the original's 4 s: a new store shows sooner


def test_macos_defaults_leave_com_apple_xattrs_to_the_core() -> None:
    """With noapplexattr the kext refuses every com.apple.* xattr with EPERM before the core
    sees it, and Finder's copy (copyfile) stops before copying any data."""
    assert "noapplexattr" not in options.default_options("darwin")


def test_macos_volume_name_is_the_callers() -> None:
    assert options.default_options("darwin", volume_name="Research PACS")["volname"] == "Research PACS"


def test_linux_defaults() -> None:
    linux = options.default_options("linux")
    assert linux == {
        "fsname": "dicomfuse",
        "subtype": "dicomfuse",     # mount shows fuse.dicomfuse
        "attr_timeout": "1",        # small, not zero: zero behaves badly on Linux (mountpoint-s3)
        "entry_timeout": "1",
        "negative_timeout": "1",
        "hard_remove": True,
        "max_idle_threads": "10",   # else libfuse 3.12-3.15 print "Ignoring invalid max threads value"
    }
    assert set(linux) <= LIBFUSE3_KNOWN and not MACOS_ONLY & set(linux), "libfuse 3 refuses unknown options"


def test_windows_via_fuse_defaults() -> None:
    win = options.default_options("win32")
    assert win == {"fsname": "dicomfuse", "attr_timeout": "1", "entry_timeout": "1", "negative_timeout": "1",
                   "hard_remove": True, "uid": "-1", "gid": "-1", "volname": "DICOMFuse"}
    assert not (MACOS_ONLY - {"volname"}) & set(win), "WinFsp's FUSE layer takes volname, not the others"
    # WinFsp's FUSE layer reads attr_timeout=%d (whole seconds, as FileInfoTimeout in ms); it
    # accepts and discards entry_timeout, negative_timeout and hard_remove.
    assert str(win["attr_timeout"]).isdigit()


def test_libfuse3_gets_hard_remove_in_its_config_not_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    mfusepy = pytest.importorskip("mfusepy")
    monkeypatch.setattr(mfusepy, "fuse_version_major", 3)
    from dicomfuse.backends.fuse import _FUSE

    linux = options.default_options("linux")
    assert sorted(_FUSE._normalize_fuse_options(**linux)) == sorted(
        ["fsname=dicomfuse", "subtype=dicomfuse", "attr_timeout=1", "entry_timeout=1", "negative_timeout=1",
         "max_idle_threads=10"])


@pytest.mark.skipif(LIBFUSE_MAJOR != 3, reason="drives the libfuse 3 of this machine")
def test_libfuse3_init_sets_hard_remove_in_fuse_config() -> None:
    from tests.replay.fuse_boundary import Caller, FuseBoundary

    core = types.SimpleNamespace(start=lambda: None, notify_changed=lambda path: None)
    with FuseBoundary(core, Caller("mount", 1), platform="linux") as boundary:  # type: ignore[arg-type]
        assert boundary.config.hard_remove == 1, "init copies it into struct fuse_config"


def test_macfuse_gets_every_option_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    mfusepy = pytest.importorskip("mfusepy")
    monkeypatch.setattr(mfusepy, "fuse_version_major", 2)  # macFUSE speaks the libfuse 2 API
    from dicomfuse.backends.fuse import _FUSE

    mac = {k: v for k, v in options.default_options("darwin").items() if k != "noapplexattr"}
    assert sorted(_FUSE._normalize_fuse_options(**mac)) == sorted([
        "fsname=dicomfuse", "attr_timeout=1", "entry_timeout=1", "negative_timeout=1", "hard_remove",
        "volname=DICOMFuse", "noappledouble", "defer_permissions", "nolocalcaches"])


def test_extra_options_override_defaults_and_allow_other_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    extra = options.parse_extra(["allow_other, max_read=131072", "attr_timeout=5"])
    assert extra == {"allow_other": True, "max_read": "131072", "attr_timeout": "5"}
    with caplog.at_level(logging.WARNING, logger="dicomfuse.backends.options"):
        merged = options.merge(options.default_options("linux"), extra)
    assert merged["attr_timeout"] == "5" and merged["allow_other"] is True and merged["subtype"] == "dicomfuse"
    assert any("allow_other" in r.getMessage() for r in caplog.records)
    assert options.parse_extra(None) == {} and options.parse_extra(" , ") == {}


@pytest.mark.parametrize(("typed", "parsed"), [
    ("-o allow_other", {"allow_other": True}),  # as a libfuse user types them
    ("-o allow_other -o max_read=65536", {"allow_other": True, "max_read": "65536"}),
    ("-oallow_other,x=1", {"allow_other": True, "x": "1"}),
    ("[]", {}),  # the original tool's printed default
    ("[allow_other, x=1]", {"allow_other": True, "x": "1"}),
    ("volname=My Data,fsname=a-ob", {"volname": "My Data", "fsname": "a-ob"}),  # values keep spaces and "-o"
])
def test_extra_mount_options_as_users_type_them(typed: str, parsed: dict[str, object]) -> None:
    assert options.parse_extra(typed) == parsed


def test_no_attribute_caching_when_listings_give_no_sizes() -> None:
    """tar archives the size it saw at stat: a size 0 shown to ls -l must not stay in the
    kernel's attribute cache for it (Linux, macOS; WinFsp is left as it is)."""
    from dicomfuse.backends.options import default_options

    for platform in ("linux", "darwin"):
        assert default_options(platform)["attr_timeout"] == "1"
        assert default_options(platform, sizes_listed=False)["attr_timeout"] == "0"
    assert default_options("win32", sizes_listed=False)["attr_timeout"] == "1"
