"""The command line: the original's flags, one-line errors with exit code 2, help."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dicomfuse.cli.main import EXIT_USAGE, main, parse_settings
from dicomfuse.cli.settings import Settings


def test_original_flags_and_defaults(tmp_path: Path):
    s = parse_settings(["-a", str(tmp_path), "-p", str(tmp_path / "m")])
    assert s.cacheTime == (60, 300) and s.cacheSize == 10000 and s.enableDeletion is True
    assert s.cache_bytes == 10000 * 1024 * 1024
    s = parse_settings(["--datasetAddr", "http://h/dicom-web", "--mountPath", "/m", "-t", "5,10", "-s", "100",
                        "-k", "/key.json", "--extraMountOptions", "allow_other,max_read=4096"])
    assert s.cacheTime == (5, 10) and s.cacheSize == 100 and s.keyFile == Path("/key.json")
    assert s.extraMountOptions == "allow_other,max_read=4096"


def test_relative_paths_are_made_absolute_where_the_command_was_typed(tmp_path: Path, monkeypatch):
    """The mounted process runs in / (libfuse moves it there): a relative folder or file given
    on the command line must already name its absolute place."""
    from dicomfuse.stores.open import open_dataset

    (tmp_path / "data" / "store").mkdir(parents=True)
    (tmp_path / "key.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    s = parse_settings(["-a", "data", "-p", "m", "--cacheDir", "c", "--logDir", "l", "-k", "key.json"])
    assert (s.cacheDir, s.logDir, s.keyFile) == (tmp_path / "c", tmp_path / "l", tmp_path / "key.json")
    assert s.mountPath == tmp_path / "m"  # dicomfuse prefetch waits for it to be mounted, from /
    monkeypatch.setenv("HOME", str(tmp_path))
    # the shell leaves ~ alone after "=": each path option expands it
    s = parse_settings(["-a", "data", "--mountPath=~/m", "--keyFile=~/key.json"])
    assert (s.mountPath, s.keyFile) == (tmp_path / "m", tmp_path / "key.json")
    if sys.platform == "win32":
        assert parse_settings(["-a", "data", "-p", "J:"]).mountPath == Path("J:")  # a drive letter stays one
    dataset = open_dataset(s.datasetAddr)
    monkeypatch.chdir("/")
    assert list(dataset.list_stores()) == ["store"]


def test_timeouts_and_ca_bundle(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = parse_settings(["-a", "/x", "-p", "/m", "--httpTimeout", "2.5", "--caBundle", str(ca)])
    assert s.httpTimeout == (2.5, 2.5) and s.caBundle == ca
    assert parse_settings(["-a", "/x", "-p", "/m"]).httpTimeout == (10.0, 60.0)
    assert parse_settings(["-a", "/x", "-p", "/m", "--httpTimeout", ".5, 10."]).httpTimeout == (0.5, 10.0)
    assert parse_settings(["-a", "/x", "-p", "/m", "-t", " 0, 007"]).cacheTime == (0, 7)


@pytest.mark.parametrize("spelling", [["--enableDeletion=false"], ["--enableDeletion", "false"], ["-d", "false"],
                                      ["-d", "False"], ["--enableDeletion=no"]])
def test_enable_deletion_spellings(spelling):
    assert parse_settings(["-a", "/x", "-p", "/m", *spelling]).enableDeletion is False


@pytest.mark.parametrize("argv,fragment", [
    (["-p", "/m"], "--datasetAddr"),
    (["-a", "/x"], "--mountPath"),
    (["-a", "/x", "-p", "/m", "-t", "60"], "--cacheTime: expected two whole numbers"),
    (["-a", "/x", "-p", "/m", "-t", "a,b"], "--cacheTime"),
    (["-a", "/x", "-p", "/m", "-t", "²,3"], "--cacheTime: expected two whole numbers"),  # int() refused it
    (["-a", "/x", "-p", "/m", "-t", "٣,٣"], "--cacheTime: expected two whole numbers"),  # int() took it
    (["-a", "/x", "-p", "/m", "-t", "+3,3"], "--cacheTime: expected two whole numbers"),
    (["-a", "/x", "-p", "/m", "-s", "lots"], "--cacheSize"),
    (["-a", "/x", "-p", "/m", "-s", "1"], "--cacheSize: must be at least 4"),
    (["-a", "/x", "-p", "/m", "-d", "maybe"], "--enableDeletion: expected true or false"),
    (["-a", "/x", "-p", "/m", "--orthancRest", "ftp://x"], "--orthancRest"),
    (["-a", "/x", "-p", "/m", "--bogus"], "unrecognized arguments"),
    (["--datsetAddr", "/x", "-p", "/m"], "unrecognized arguments: --datsetAddr (did you mean --datasetAddr?)"),
    (["-a", "/x", "-p", "/m", "-s", "10000MB"], "--cacheSize: expected a whole number of megabytes"),
    (["-a", "/x", "-p", "/m", "-s", "١٠٠٠"], "--cacheSize: expected a whole number of megabytes"),  # int() took it
    (["-a", "/x", "-p", "/m", "--readAhead", "x"], "--readAhead: expected a whole number"),
    (["-a", "/x", "-p", "/m", "--httpTimeout", "0,5"], "--httpTimeout: expected two positive"),
    (["-a", "/x", "-p", "/m", "--httpTimeout", "soon"], "--httpTimeout: expected seconds"),
    (["-a", "/x", "-p", "/m", "--httpTimeout", "٣,٣"], "--httpTimeout: expected seconds"),  # float() took them
    (["-a", "/x", "-p", "/m", "--httpTimeout", "nan"], "--httpTimeout: expected seconds"),
    (["-a", "/x", "-p", "/m", "--httpTimeout", "inf"], "--httpTimeout: expected seconds"),
    (["-a", "/x", "-p", "/m", "--httpTimeout", "99999999999999999999"], "--httpTimeout: at most 86400"),
    (["-a", "/x", "-p", "/m", "--caBundle", "/no/such/ca.pem"],
     f"--caBundle: {Path('/no/such/ca.pem')} is not a readable"),  # the path as this OS writes it
    (["-a", "/x", "-p", "/m", "--uploadMode", "later"], "--uploadMode: expected sync or writeback"),
    (["-a", "/x", "-p", "/m", "--readAhead", "-1"], "--readAhead: must be between 0 and 256"),
])
def test_bad_values_print_one_line_and_exit_2(argv, fragment, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dicomfuse: error:"), err
    assert fragment in err


def test_bad_addresses_and_mount_paths(tmp_path: Path, capsys):
    mnt = tmp_path / "mnt"
    assert main(["-a", str(tmp_path / "missing"), "-p", str(tmp_path), "--logDir", str(tmp_path / "l")]) == EXIT_USAGE
    refusals = 3
    if sys.platform != "win32":  # Windows mounts on a new folder (WinFsp makes it): this one would really mount
        assert main(["-a", str(tmp_path), "-p", str(mnt), "--logDir", str(tmp_path / "l")]) == EXIT_USAGE
        refusals += 1
    mnt.mkdir()
    (mnt / "file").write_text("x")
    assert main(["-a", str(tmp_path), "-p", str(mnt), "--logDir", str(tmp_path / "l")]) == EXIT_USAGE
    assert main(["-a", "ftp://host/x", "-p", str(tmp_path / "l"), "--logDir", str(tmp_path / "l")]) == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[2].strip() for line in lines if line.startswith("dicomfuse: error:")] == [
        "--datasetAddr", "--mountPath", "--mountPath", "--mountPath"] or len(lines) >= refusals


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"--{name}" in out
    for short in ("-a", "-p", "-t", "-s", "-d", "-k", "-h"):
        assert short in out


def test_unreachable_server_exits_1_without_mounting(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc = main(["-a", "http://127.0.0.1:9/dicom-web", "-p", str(mnt), "--logDir", str(tmp_path / "logs"),
               "--cacheDir", str(tmp_path / "cache")])
    assert rc == 1
    assert "Cannot reach the dataset" in (tmp_path / "logs" / "error.log").read_text()


def test_a_server_that_refuses_the_start_up_search_is_not_called_unreachable(tmp_path: Path):
    """It was reached: the log says it refused, with the status, and never the server's words."""
    import json

    from tests.fakes.http_server import LoopbackServer, Reply

    words = "limit must be 1..200 for patient Doe^Jane"
    server = LoopbackServer(lambda seen: Reply(400, json.dumps({"message": words}).encode(),
                                               {"Content-Type": "application/json"}))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        rc = main(["-a", f"{server.base_url}/v1", "-p", str(mnt), "--logDir", str(tmp_path / "logs"),
                   "--cacheDir", str(tmp_path / "cache")])
    finally:
        server.stop()
    assert rc == 1
    log = (tmp_path / "logs" / "error.log").read_text()
    assert "The server refused the start-up search: GET /v1/studies: HTTP 400 Bad Request" in log
    assert "Cannot reach" not in log and words not in log
    assert "root missing" not in log  # it has one


def test_a_server_address_without_its_dicomweb_root_says_it_may_be_missing(tmp_path: Path):
    """http://host:8042 for Orthanc: its REST API refuses /studies (400), and the message said
    nothing of the /dicom-web that was left out."""
    from tests.fakes.http_server import LoopbackServer, Reply

    server = LoopbackServer(lambda seen: Reply(400, b"{}", {"Content-Type": "application/json"}))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        rc = main(["-a", server.base_url, "-p", str(mnt), "--logDir", str(tmp_path / "logs"),
                   "--cacheDir", str(tmp_path / "cache"), "--orthancRest", "off"])
    finally:
        server.stop()
    assert rc == 1
    assert f"is the DICOMweb root missing from the address? Orthanc's is {server.base_url}/dicom-web" in (
        tmp_path / "logs" / "error.log").read_text()


def test_the_adapter_follows_the_system_and_the_installed_binding():
    from dicomfuse.backends import adapter_name

    assert adapter_name("linux") == "fuse" and adapter_name("darwin") == "fuse"
    assert adapter_name("win32", winfspy_installed=True) == "winfsp"
    assert adapter_name("win32", winfspy_installed=False) == "fuse"  # Python >= 3.12: WinFsp's FUSE layer


def test_windows_mount_points_are_checked_before_anything_starts(tmp_path):
    from dicomfuse.cli.main import UsageError, check_mount_path

    assert check_mount_path(Path("j:"), platform="win32") == "J:"
    for bad, why in ((Path("J"), "not a drive letter"), (tmp_path / "missing" / "mnt", "does not exist")):
        with pytest.raises(UsageError, match=why) as exc:
            check_mount_path(bad, platform="win32")
        assert str(exc.value).startswith("--mountPath: ")
    assert check_mount_path(tmp_path / "new", platform="win32") == str(tmp_path / "new")


@pytest.mark.skipif(sys.platform == "win32", reason="winfspy, not a FUSE library path, serves Windows")
def test_a_missing_fuse_library_is_one_clear_line_not_a_traceback(tmp_path):
    import os
    import subprocess

    (tmp_path / "ds" / "store").mkdir(parents=True)
    (tmp_path / "mnt").mkdir()
    env = {**os.environ, "FUSE_LIBRARY_PATH": str(tmp_path / "no-such-libfuse.so")}
    result = subprocess.run([sys.executable, "-m", "dicomfuse", "-a", str(tmp_path / "ds"), "-p", str(tmp_path / "mnt"),
                             "--cacheDir", str(tmp_path / "cache"), "--logDir", str(tmp_path / "logs")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "FUSE is not installed or could not be loaded" in result.stderr and "Traceback" not in result.stderr
    left = [p for p in (tmp_path / "cache" / "mounts").iterdir() if p.name != ".lock"]  # Windows: the starts' lock
    assert not left, "the cache of the mount that never came is wiped"


def test_a_mistyped_command_is_named_not_taken_for_a_mount(capsys):
    from dicomfuse.cli.main import main

    assert main(["stauts"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'stauts'" in err and "status" in err and "required" not in err


def test_an_unexpected_error_is_one_line_that_does_not_quote_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """A bug, or a library failing on a server's answer (google-auth reading a token answer that
    is not one): exit 1 with one line naming the error's type, the stack in the debug log, and
    the message nowhere, for it may quote patient data or a credential."""
    import dicomfuse.cli.main as cli_main

    secret = "ZEBRA^SECRET"

    def fails(settings: object) -> int:
        int(secret)
        return 0

    monkeypatch.setattr(cli_main, "mount", fails)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc = main(["-a", "http://127.0.0.1:9/dicom-web", "-p", str(mnt), "--logDir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "dicomfuse stopped on an unexpected ValueError" in err and "Traceback" not in err
    debug = (tmp_path / "logs" / "debug.log").read_text()
    assert "in fails" in debug
    assert secret not in err + debug


def test_a_key_file_for_an_address_that_is_not_a_healthcare_dataset_is_said_to_be_unused(tmp_path: Path):
    """A store URL (…/dicomStores/S) on a Private Service Connect host is a DICOMweb root: the key
    went unused without a word, and the server's 401 was all the user saw."""
    from tests.fakes.http_server import LoopbackServer, Reply

    server = LoopbackServer(lambda seen: Reply(401, b"{}", {"Content-Type": "application/json"}))
    key = tmp_path / "key.json"
    key.write_text("{}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        rc = main(["-a", f"{server.base_url}/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb",
                   "-p", str(mnt), "-k", str(key), "--logDir", str(tmp_path / "logs"),
                   "--cacheDir", str(tmp_path / "cache"), "--orthancRest", "off"])
    finally:
        server.stop()
    assert rc == 1
    assert "--keyFile is not used" in (tmp_path / "logs" / "info.log").read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGHUP on Windows")
def test_sighup_during_the_shutdown_only_prints_still_unmounting():
    """Closing the terminal (or losing the SSH session) while the shutdown waits for uploads
    must not end the process: the cache of patient data would stay on disk."""
    import subprocess

    code = ("import logging, os, signal\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "from dicomfuse.cli.main import _ignore_interrupts\n"
            "_ignore_interrupts()\n"
            "for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):\n"
            "    os.kill(os.getpid(), sig)\n"
            "print('shutdown finished')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "shutdown finished\n"
    assert "Still unmounting" in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="WinFsp takes the mount point itself")
def test_a_second_start_on_a_mount_point_being_mounted_is_refused(tmp_path: Path, capsys):
    """Two starts on one mount point at the same moment both passed the early checks and both
    mounted, stacked: the one that comes second to the mount point's lock is refused."""
    import fcntl
    import os

    from dicomfuse.cli.main import UsageError, claim_mount_point

    (tmp_path / "ds" / "store").mkdir(parents=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    first = claim_mount_point(str(mnt))  # the other start: it holds the folder while it mounts
    try:
        argv = ["-a", str(tmp_path / "ds"), "-p", str(mnt), "--cacheDir", str(tmp_path / "cache"),
                "--logDir", str(tmp_path / "logs")]
        assert main(argv) == EXIT_USAGE
        assert capsys.readouterr().err == f"dicomfuse: error: --mountPath: another dicomfuse is mounting on {mnt}\n"
        assert not (tmp_path / "cache").exists(), "refused before anything was made"
    finally:
        os.close(first)
    second = claim_mount_point(str(mnt))  # free again once the first start ends
    try:
        probe = os.open(mnt, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        os.close(second)
    (mnt / "file").write_text("x")  # checked again once the lock is held
    with pytest.raises(UsageError, match="is not empty"):
        claim_mount_point(str(mnt))


def test_a_held_write_back_queue_is_named_for_what_holds_it(tmp_path: Path, capsys):
    """A sync mount sending uploads an earlier one left holds the queue too: the refusal must not
    say that a write-back mount uses the folder."""
    from dicomfuse.core.writeback import WriteBackQueue, queue_dir

    (tmp_path / "ds" / "store").mkdir(parents=True)
    (tmp_path / "mnt").mkdir()
    cache = tmp_path / "cache"
    queue_dir(cache).mkdir(parents=True)
    holder = WriteBackQueue(queue_dir(cache), lambda store, items: [], settle=0.0)  # the other mount
    try:
        assert main(["-a", str(tmp_path / "ds"), "-p", str(tmp_path / "mnt"), "--uploadMode", "writeback",
                     "--cacheDir", str(cache), "--logDir", str(tmp_path / "logs")]) == EXIT_USAGE
    finally:
        holder.stop()
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"dicomfuse: error: --uploadMode writeback: another running mount holds the write-back queue of "
                   f"the cache folder {cache} (a write-back mount, or one sending uploads an earlier mount left); "
                   "give this one its own --cacheDir, or stop that mount first")
    assert "in write-back mode uses" not in err
