"""The streaming multipart/related reader used by WADO-RS retrieve."""

from __future__ import annotations

import io

import pytest

from dicomfuse.stores.base import StoreError, Unavailable
from dicomfuse.stores.http import MultipartReader, parse_content_type

BOUNDARY = "b0undary-1234"
PAYLOAD = b"DICM\r\n--not-the-boundary\r\n\r\n\x00\x01\r\n--b0undar\r\n--b0undary-1234X\r\n\xff" * 3


def multipart(
    *bodies: bytes,
    boundary: str = BOUNDARY,
    preamble: bytes = b"",
    headers: bytes = b"Content-Type: application/dicom\r\n",
    epilogue: bytes = b"\r\n",
) -> bytes:
    out = preamble
    if preamble:
        out += b"\r\n"
    for body in bodies:
        out += b"--" + boundary.encode() + b"\r\n" + headers + b"\r\n" + body + b"\r\n"
    return out + b"--" + boundary.encode() + b"--" + epilogue


def read_in_chunks(stream: bytes, cuts: list[int], boundary: str = BOUNDARY) -> tuple[bytes, int]:
    sink = io.BytesIO()
    reader = MultipartReader(boundary, sink)
    edges = [0, *cuts, len(stream)]
    for start, end in zip(edges, edges[1:], strict=False):
        reader.feed(stream[start:end])
    written = reader.finish()
    return sink.getvalue(), written


def test_whole_stream_in_one_chunk() -> None:
    body, written = read_in_chunks(multipart(PAYLOAD), [])
    assert body == PAYLOAD
    assert written == len(PAYLOAD)


def test_every_single_cut_position() -> None:
    stream = multipart(PAYLOAD)
    for cut in range(1, len(stream)):
        body, _ = read_in_chunks(stream, [cut])
        assert body == PAYLOAD, f"cut at {cut}"


def test_every_pair_of_cuts_around_the_closing_delimiter() -> None:
    stream = multipart(PAYLOAD)
    tail = stream.rindex(b"\r\n--" + BOUNDARY.encode())
    positions = range(tail - 3, len(stream))
    for first in positions:
        for second in positions:
            if first < second:
                body, _ = read_in_chunks(stream, [first, second])
                assert body == PAYLOAD, f"cuts at {first}, {second}"


def test_one_byte_at_a_time() -> None:
    stream = multipart(PAYLOAD, preamble=b"preamble text")
    body, _ = read_in_chunks(stream, list(range(1, len(stream))))
    assert body == PAYLOAD


@pytest.mark.parametrize("payload", [b"", b"\r\n", b"\r\n\r\n", b"--", b"\r\n--", b"x" * 5000])
def test_edge_payloads(payload: bytes) -> None:
    stream = multipart(payload)
    for cut in range(1, len(stream)):
        assert read_in_chunks(stream, [cut])[0] == payload


def test_preamble_and_part_headers_are_not_written() -> None:
    stream = multipart(
        b"body",
        preamble=b"This is a preamble --b0undary-1234 mentioned inline",
        headers=b"Content-Type: application/dicom\r\nContent-Length: 4\r\nMIME-Version: 1.0\r\n",
    )
    assert read_in_chunks(stream, [])[0] == b"body"


def test_part_without_headers() -> None:
    stream = b"--" + BOUNDARY.encode() + b"\r\n\r\nraw body\r\n--" + BOUNDARY.encode() + b"--"
    assert read_in_chunks(stream, [])[0] == b"raw body"


def test_transport_padding_after_boundary() -> None:
    stream = b"--" + BOUNDARY.encode() + b" \t\r\n\r\nbody\r\n--" + BOUNDARY.encode() + b"--\r\n"
    assert read_in_chunks(stream, [])[0] == b"body"


def test_only_the_first_part_is_written() -> None:
    stream = multipart(b"first", b"second part", b"third")
    sink = io.BytesIO()
    reader = MultipartReader(BOUNDARY, sink)
    reader.feed(stream)
    assert reader.finish() == 5
    assert sink.getvalue() == b"first"
    assert reader.parts == 3


def test_epilogue_after_closing_boundary_is_ignored() -> None:
    stream = multipart(b"body", epilogue=b"\r\ntrailing junk --b0undary-1234\r\n")
    assert read_in_chunks(stream, [len(stream) - 5])[0] == b"body"


def test_done_after_closing_boundary() -> None:
    reader = MultipartReader(BOUNDARY, io.BytesIO())
    stream = multipart(b"body")
    reader.feed(stream[:-4])
    assert not reader.done
    reader.feed(stream[-4:])
    assert reader.done


@pytest.mark.parametrize("cut_back", [1, 2, 5, len(BOUNDARY) + 4, 20, 60])
def test_truncated_stream_raises(cut_back: int) -> None:
    stream = multipart(PAYLOAD, epilogue=b"")
    reader = MultipartReader(BOUNDARY, io.BytesIO())
    reader.feed(stream[:-cut_back])
    with pytest.raises(Unavailable, match="truncated"):
        reader.finish()


def test_empty_stream_raises() -> None:
    reader = MultipartReader(BOUNDARY, io.BytesIO())
    with pytest.raises(Unavailable):
        reader.finish()


def test_content_length_mismatch_raises() -> None:
    stream = multipart(b"short", headers=b"Content-Type: application/dicom\r\nContent-Length: 99\r\n")
    reader = MultipartReader(BOUNDARY, io.BytesIO())
    with pytest.raises(Unavailable, match="Content-Length"):
        reader.feed(stream)
        reader.finish()


def test_runaway_headers_raise() -> None:
    reader = MultipartReader(BOUNDARY, io.BytesIO())
    with pytest.raises(StoreError, match="headers too long"):
        reader.feed(b"--" + BOUNDARY.encode() + b"\r\nX-Header: ")
        for _ in range(100):
            reader.feed(b"a" * 1024)


def test_partial_writes_of_a_raw_sink_are_completed() -> None:
    class TrickleSink(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.data += bytes(b[:3])
            return min(3, len(b))

    sink = TrickleSink()
    reader = MultipartReader(BOUNDARY, sink)  # type: ignore[arg-type]
    reader.feed(multipart(PAYLOAD))
    reader.finish()
    assert bytes(sink.data) == PAYLOAD


def test_quoted_boundary_parameter() -> None:
    header = 'multipart/related; type="application/dicom"; boundary="a b:c=d"; transfer-syntax=*'
    media_type, params = parse_content_type(header)
    assert media_type == "multipart/related"
    assert params["boundary"] == "a b:c=d"
    assert params["type"] == "application/dicom"
    assert params["transfer-syntax"] == "*"
    stream = multipart(PAYLOAD, boundary=params["boundary"])
    for cut in range(1, len(stream), 7):
        assert read_in_chunks(stream, [cut], boundary=params["boundary"])[0] == PAYLOAD


def test_orthanc_shaped_response() -> None:
    boundary = "c60c11f2-7196-4599-b0a0-c4ba8638f5a1-d2fd33f2-7963-4018-a846-bba931f59"
    payload = bytes(range(256)) * 40
    stream = (
        (
            f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(payload)}\r\n"
            "MIME-Version: 1.0\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    for chunk_size in (1, 7, 64, 1000, len(stream)):
        cuts = list(range(chunk_size, len(stream), chunk_size))
        assert read_in_chunks(stream, cuts, boundary=boundary)[0] == payload
