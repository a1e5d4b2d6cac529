"""Transfer syntaxes in WADO-RS: Accept headers that name one, and the check that an answer is in
the transfer syntax the server stores the instance in.

A WADO-RS server sends an instance as stored only when asked for ``transfer-syntax=*`` or for the
stored syntax by its UID; asked for nothing, PS3.18 lets it transcode to Explicit VR Little
Endian. :class:`StoredSyntaxCheck` refuses an answer that says (in a Content-Type, a part
header, or the Part-10 file meta of its bytes) that it is in another syntax than the stored
one, before any of its bytes reach the sink.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from typing import BinaryIO

from dicomfuse.stores.base import Transcoded, write_all
from dicomfuse.stores.http import parse_content_type

WILDCARD = "*"
"""``transfer-syntax=*``: the instance as stored."""

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
"""Explicit VRs whose value length takes 4 bytes (after 2 reserved ones)."""
MAX_META_BYTES = 64 * 1024
"""Bytes held back at most while looking for the file meta's TransferSyntaxUID."""


def is_uid(value: str) -> bool:
    """Whether ``value`` is shaped like a DICOM UID (digits and dots, at most 64 characters): only
    such values from a server are ever quoted."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def transfer_syntax_of(media_type: str | None) -> str | None:
    """The ``transfer-syntax`` parameter of a Content-Type or Accept value, or None."""
    value = parse_content_type(media_type)[1].get("transfer-syntax")
    return value.strip() if value is not None and value.strip() else None


def with_transfer_syntax(accept: str, uid: str) -> str:
    """``accept`` asking for transfer syntax ``uid``: its ``transfer-syntax`` parameter replaced,
    or one added."""
    params = [p.strip() for p in accept.split(";")]
    kept = [p for p in params[1:] if p.partition("=")[0].strip().lower() != "transfer-syntax"]
    return "; ".join([params[0], *kept, f"transfer-syntax={uid}"])


def file_meta_transfer_syntax(head: bytes | bytearray) -> str | None:
    """The TransferSyntaxUID (0002,0010) of a Part-10 file's meta information from the file's
    first bytes: the UID, ``""`` when there is none to find (no ``DICM`` preamble, or the meta
    group ends without it), or None when more bytes are needed to tell."""
    if len(head) < 132:
        return None
    if head[128:132] != b"DICM":
        return ""
    position = 132
    while True:
        if len(head) < position + 8:
            return None
        group, element = struct.unpack_from("<HH", head, position)
        if group != 0x0002:
            return ""
        if bytes(head[position + 4 : position + 6]) in _LONG_LENGTH_VRS:
            if len(head) < position + 12:
                return None
            (length,) = struct.unpack_from("<I", head, position + 8)
            start = position + 12
            if length == 0xFFFFFFFF:
                return ""  # an undefined length in the file meta: malformed
        else:
            (length,) = struct.unpack_from("<H", head, position + 6)
            start = position + 8
        if element == 0x0010:
            if len(head) < start + length:
                return None
            return bytes(head[start : start + length]).rstrip(b"\x00 ").decode("ascii", "replace").strip()
        position = start + length


class StoredSyntaxCheck:
    """A sink between a WADO-RS answer and the real sink that lets the answer's bytes through only
    if they are in ``stored``, the transfer syntax the server says it stores instance ``sop_uid``
    in. Every transfer syntax the answer declares goes through :meth:`declared`; the body's first
    bytes are held until its file meta's TransferSyntaxUID is read and checked. Call
    :meth:`finish` at the end of the body: it checks what it could not yet and hands the bytes
    still held on."""

    def __init__(self, sink: BinaryIO, sop_uid: str, stored: str) -> None:
        self.sink = sink
        self.sop_uid = sop_uid
        self.stored = stored
        self._held = bytearray()
        self._checked = False  # the file meta was checked (or cannot be): bytes go straight through

    def declared(self, value: str | None, where: str) -> None:
        """Raise :class:`Transcoded` if ``value`` (a ``transfer-syntax`` parameter the answer
        carries in ``where``) names another syntax than the stored one."""
        if value is not None and value != WILDCARD and value != self.stored:
            self._refuse(value, where)

    def part_headers(self, headers: Mapping[str, str]) -> None:
        """The check of a multipart answer's first part headers (:class:`MultipartReader` calls
        it before the part's first body byte)."""
        self.declared(transfer_syntax_of(headers.get("content-type")), "its part header")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._checked:
            write_all(self.sink, data)
            return len(data)
        self._held += data
        found = file_meta_transfer_syntax(self._held)
        if found is not None or len(self._held) > MAX_META_BYTES:
            self._check_meta(found)
        return len(data)

    def flush(self) -> None:
        pass  # bytes held are not the sink's until checked

    def finish(self) -> None:
        """The body ended: check what is held (a file shorter than its meta cannot be checked)
        and hand it on."""
        if not self._checked:
            self._check_meta(file_meta_transfer_syntax(self._held))

    def _check_meta(self, found: str | None) -> None:
        if found:
            self.declared(found, "its file meta information")
        self._checked = True
        held, self._held = self._held, bytearray()
        if held:
            write_all(self.sink, held)

    def _refuse(self, value: str, where: str) -> None:
        shown = value if is_uid(value) else "of another kind"
        raise Transcoded(
            f"instance {self.sop_uid}: the server sent transfer syntax {shown} ({where}) where it stores "
            f"{self.stored}; those are not the stored bytes, so they are not served"
        )

