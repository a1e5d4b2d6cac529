"""Transfer syntaxes in WADO-RS: Accept headers and the check that an answer is the stored syntax."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomfuse.samples import make_uid, write_instance
from dicomfuse.stores.base import Transcoded
from dicomfuse.stores.http import MultipartReader
from dicomfuse.stores.transfer_syntax import (
    StoredSyntaxCheck,
    file_meta_transfer_syntax,
    is_uid,
    transfer_syntax_of,
    with_transfer_syntax,
)

SOP = make_uid("ts-unit", "instance")


def part10(tmp_path: Path, syntax: str) -> bytes:
    return write_instance(tmp_path / f"{syntax}.dcm", make_uid("s"), make_uid("se"), SOP,
                          transfer_syntax=syntax).read_bytes()


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_file_meta_transfer_syntax_needs_only_the_meta(tmp_path: Path, syntax: str) -> None:
    data = part10(tmp_path, syntax)
    assert file_meta_transfer_syntax(data) == syntax
    meta_end = next(n for n in range(len(data)) if file_meta_transfer_syntax(data[:n]) is not None)
    assert meta_end < 400
    assert all(file_meta_transfer_syntax(data[:n]) is None for n in range(meta_end))


def test_file_meta_transfer_syntax_of_other_bytes() -> None:
    assert file_meta_transfer_syntax(b"x" * 200) == ""  # no DICM: nothing to check
    assert file_meta_transfer_syntax(b"\0" * 128 + b"DICM" + b"\x08\x00\x16\x00UI\x02\x001\0") == ""  # no group 2


def test_accepts_naming_a_transfer_syntax() -> None:
    wildcard = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    assert transfer_syntax_of(wildcard) == "*"
    assert transfer_syntax_of("application/dicom") is None
    assert with_transfer_syntax(wildcard, "1.2.840.10008.1.2") == (
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2')
    assert with_transfer_syntax("application/dicom", "1.2.840.10008.1.2") == (
        "application/dicom; transfer-syntax=1.2.840.10008.1.2")
    assert is_uid("1.2.840.10008.1.2.4.50") and not is_uid("1.2.<b>") and not is_uid("1." * 40)


def test_the_check_lets_the_stored_syntax_through_unchanged_in_any_chunks(tmp_path: Path) -> None:
    data = part10(tmp_path, ImplicitVRLittleEndian)
    for size in (1, 7, 131, 4096, len(data)):
        sink = io.BytesIO()
        check = StoredSyntaxCheck(sink, SOP, ImplicitVRLittleEndian)
        check.declared(ImplicitVRLittleEndian, "its part header")
        check.declared("*", "its Content-Type")
        for start in range(0, len(data), size):
            check.write(memoryview(data)[start:start + size])
        check.finish()
        assert sink.getvalue() == data, size


def test_the_check_holds_every_byte_of_another_syntax(tmp_path: Path) -> None:
    data = part10(tmp_path, ExplicitVRLittleEndian)
    sink = io.BytesIO()
    check = StoredSyntaxCheck(sink, SOP, ImplicitVRLittleEndian)
    with pytest.raises(Transcoded) as caught:
        for start in range(0, len(data), 16):
            check.write(data[start:start + 16])
    assert sink.getvalue() == b""
    assert str(caught.value) == (
        f"instance {SOP}: the server sent transfer syntax {ExplicitVRLittleEndian} (its file meta information) "
        f"where it stores {ImplicitVRLittleEndian}; those are not the stored bytes, so they are not served")


def test_a_declared_value_that_is_not_a_uid_is_not_quoted() -> None:
    with pytest.raises(Transcoded) as caught:
        StoredSyntaxCheck(io.BytesIO(), SOP, ImplicitVRLittleEndian).declared("Secret^Patient", "its part header")
    assert "Secret" not in str(caught.value) and "of another kind" in str(caught.value)


def test_a_short_body_without_file_meta_is_handed_on_at_its_end() -> None:
    sink = io.BytesIO()
    check = StoredSyntaxCheck(sink, SOP, ImplicitVRLittleEndian)
    check.write(b"DICM")
    assert sink.getvalue() == b""
    check.finish()
    assert sink.getvalue() == b"DICM"


def test_the_multipart_reader_shows_the_first_part_headers_before_its_body() -> None:
    stream = (b"--b\r\nContent-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n\r\n"
              + b"body" * 100 + b"\r\n--b--")
    sink = io.BytesIO()
    check = StoredSyntaxCheck(sink, SOP, ImplicitVRLittleEndian)
    reader = MultipartReader("b", sink, check.part_headers)
    with pytest.raises(Transcoded, match="1.2.840.10008.1.2.1 \\(its part header\\)"):
        reader.feed(stream)
    assert sink.getvalue() == b""
