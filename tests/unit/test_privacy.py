"""Names users give files are kept out of log lines (core.privacy, cli.logs)."""

from __future__ import annotations

import logging

from dicomfuse.cli.logs import MessageFreeFormatter
from dicomfuse.core.paths import DicomPath
from dicomfuse.core.privacy import HIDDEN, HiddenNames

UID = "1.2.826.0.1.3680043.8.498.1"


def test_a_hidden_name_is_replaced_where_it_stands_as_a_name_only():
    names = HiddenNames()
    names.hide("DOE^JANE.dcm")
    names.hide("a")
    line = ("Upload of /store/DOE^JANE.dcm failed (upload /store/DOE^JANE.dcm refused); kept at "
            "/cache/failed/20261126-1-DOE^JANE.dcm; 'DOE^JANE.dcm' then /store/a and a cat")
    assert names.redact(line) == ("Upload of /store/<name-1> failed (upload /store/<name-1> refused); kept at "
                                  "/cache/failed/20261126-1-<name-1>; '<name-1>' then /store/<name-2> and a cat")
    assert names.redact("/store/DOE^JANE.dcmx /store/ab") == "/store/DOE^JANE.dcmx /store/ab"  # other names


def test_the_longest_hidden_name_wins_and_the_oldest_are_forgotten():
    names = HiddenNames(limit=2)
    names.hide("DOE")
    names.hide("DOE JANE.dcm")
    assert names.redact("/s/DOE JANE.dcm /s/DOE") == "/s/<name-2> /s/<name-1>"
    names.hide("third")
    assert names.redact("/s/DOE") == "/s/DOE" and names.redact("/s/third") == "/s/<name-3>"


def test_another_spelling_of_a_hidden_name_gets_its_placeholder():
    names = HiddenNames()
    names.hide("DOE^JANE notes.dcm")
    names.hide_like("DOE_JANE_notes.dcm", "DOE^JANE notes.dcm")
    names.hide_like("shown.dcm", "never hidden")
    assert names.redact("failed/1-2-DOE_JANE_notes.dcm /s/shown.dcm") == "failed/1-2-<name-1> /s/shown.dcm"


def test_paths_hide_names_below_a_store_and_files_at_the_top_but_not_uids_or_store_names():
    DicomPath.parse(f"/research/Pat^Smith.dcm/{UID}/{UID}.dcm")
    DicomPath.parse("/Top^File.dcm")
    DicomPath.parse("/untitled folder 314")
    DicomPath.parse("/research/untitled folder 314")  # Finder's default names are no one's
    line = HIDDEN.redact(f"/research/Pat^Smith.dcm /Top^File.dcm /research/{UID}/{UID}.dcm '/untitled folder 314'")
    assert "Smith" not in line and "Top^File" not in line
    assert f"/research/{UID}/{UID}.dcm" in line and "/untitled folder 314" in line


def test_the_log_formatter_hides_them_in_every_line():
    DicomPath.parse("/store/Formatter^Patient.dcm")
    record = logging.LogRecord("dicomfuse", logging.ERROR, __file__, 1, "Upload of %s failed",
                               ("/store/Formatter^Patient.dcm",), None)
    out = MessageFreeFormatter("%(levelname)s %(message)s").format(record)
    assert "Formatter^Patient" not in out and out.startswith("ERROR Upload of /store/<name-")


def test_the_mounts_own_folder_names_are_never_hidden():
    names = HiddenNames()
    for name in ("cache", "spool", "failed", "mounts"):
        names.hide(name)
    line = "Cannot create a file in the instance cache (/home/u/.cache/dicomfuse/mounts/1f/cache)"
    assert names.redact(line) == line


def test_a_name_repr_quotes_with_double_quotes_is_hidden_too():
    """repr() of a name holding an apostrophe uses double quotes (mkdir's "not a valid store ID")."""
    names = HiddenNames()
    names.hide("O'BRIEN^PAT")
    assert names.redact(f"mkdir: {chr(34)}O'BRIEN^PAT{chr(34)} is not a valid store ID") == (
        'mkdir: "<name-1>" is not a valid store ID')


def test_the_mounts_own_paths_stay_readable_whatever_was_looked_up():
    """ls store/tmp (a typo, a probe) hid 'tmp', and every later line naming the mount point or
    where a failed upload is kept read /<name-1>/..."""
    names = HiddenNames()
    names.hide("tmp")
    names.hide("DOE^JANE.dcm")
    names.keep_shown("/tmp/work/cache")
    names.hide("work")
    line = "kept at /tmp/work/cache/spool/failed/1-2-DOE^JANE.dcm"
    assert names.redact(line) == "kept at /tmp/work/cache/spool/failed/1-2-<name-2>"
