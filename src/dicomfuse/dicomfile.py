"""What makes a file acceptable as an upload: complete Part-10 DICOM with valid Study, Series
and SOP Instance UIDs. Used by the core before anything is sent, and by the local store as the
server-side check; it sits below both so neither imports the other.

pydicom accepts a file cut short without complaint, so the whole file is parsed with large
values checked by position (memory stays flat), and truncation is detected from element ends
and from pixel data shorter than the image attributes say.
"""

from __future__ import annotations

import errno as _errno
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag

from dicomfuse.tracebacks import describe

# pydicom's validation warnings quote element values, and a value can be a patient's name: never
# let them reach a log line or the terminal. Our own checks say what is wrong with a file. So do
# its exceptions and int()'s: an error is logged by type and place (the element), never message.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
# Its reading warnings ("End of file reached before delimiter…") go to the terminal as Python
# warnings with a line of its source, and to our log files through its logger: our own reason
# ("truncated DICOM file…") is the one line the user needs.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
logging.getLogger("pydicom").setLevel(logging.ERROR)

log = logging.getLogger(__name__)

UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_DEFER_SIZE = 1 << 20  # larger values are checked by position, not loaded into memory
_IN_MEMORY_MAX = 4 << 20
"""Files up to this size (most CT and MR instances) are read in one call and parsed in memory.
Parsed from the file, pydicom makes a seek system call per element, and at each one a busy
thread of the mount (a sender, a download) may take the GIL from the callback a program waits
for: ``close()`` of every file copied in does this check."""
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PADDING_MAX = 1 << 20  # zero bytes after the data set taken for padding (a tape or CD block is smaller)
_LONGEST_HEADER = 12  # tag, VR, 2 reserved bytes, 32-bit length (explicit VR OB, SQ, UT, ...)
_IMAGE_PIXEL_ATTRIBUTES = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation")
_OTHER_PIXEL_SOURCES = ("FloatPixelData", "DoubleFloatPixelData", "PixelDataProviderURL")


def is_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and _UID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class DicomUids:
    study_uid: str
    series_uid: str
    sop_uid: str


class UnusableElement(ValueError):
    """An element whose value cannot be read, or is not what the check needs. Its message names
    the element and the problem, never the value (which may be a patient's name)."""

    def __init__(self, keyword: str, problem: str) -> None:
        tag = tag_for_keyword(keyword)
        super().__init__(f"{keyword} {Tag(tag)}: {problem}" if tag is not None else f"{keyword}: {problem}")
        self.keyword = keyword


def _value(ds: pydicom.Dataset, keyword: str) -> object:
    """``ds.get(keyword)``; a value pydicom cannot convert raises :class:`UnusableElement`."""
    try:
        return ds.get(keyword)
    except Exception as exc:  # an unknown VR, a bad encoding...: the value must not be quoted
        raise UnusableElement(keyword, f"cannot be read ({type(exc).__name__})") from None


def _number(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    """The element's value as an integer (``default`` when absent or empty, if given)."""
    value = _value(ds, keyword)
    if value is None or value == "":
        if default is None:
            raise UnusableElement(keyword, "missing")
        return default
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise UnusableElement(keyword, "not a number") from None


def uids_of(ds: pydicom.Dataset) -> DicomUids | str:
    """The three UIDs, or the reason they are unusable."""
    values = []
    for keyword in UID_KEYWORDS:
        value = _value(ds, keyword)
        if value is None or value == "":
            return f"no {keyword}"
        if not is_uid(value):
            return f"{keyword} is not a valid UID"
        values.append(str(value))
    return DicomUids(*values)


class Unreadable(str):
    """check_upload's reason when the file could not be read (no file descriptor left, an I/O
    error): this computer's trouble, not the file's; ``errno`` is the system's."""

    errno: int

    def __new__(cls, exc: OSError) -> Unreadable:
        text = super().__new__(cls, f"cannot read the file ({exc.strerror or type(exc).__name__})")
        text.errno = exc.errno or _errno.EIO
        return text


def check_upload(path: Path) -> DicomUids | str:
    """The UIDs of a file to store, or the reason to refuse it.

    The whole file is parsed (no force, so the Part-10 preamble and file meta are required);
    values above 1 MiB are checked by position rather than loaded. A file whose last element
    does not end where the file ends, or whose native pixel data is shorter than its image
    attributes say, is refused as truncated."""
    try:
        data, size = _read_if_small(path)
        ds = pydicom.dcmread(path if data is None else io.BytesIO(data), defer_size=_DEFER_SIZE)
    except OSError as exc:
        return Unreadable(exc)
    except InvalidDicomError:
        return "not a DICOM Part-10 file (no 'DICM' preamble or file meta information)"
    except Exception as exc:  # pydicom raises many types on garbage; their messages quote bytes
        log.debug("cannot parse an upload: %s", describe(exc))
        return f"truncated or corrupt DICOM ({type(exc).__name__})"
    try:
        tail_of = (lambda count: _read_tail(path, count)) if data is None else (lambda count: data[size - count:])
        problem = _layout_problem(ds, size, tail_of) or _pixel_data_problem(ds)
        return problem or uids_of(ds)  # reading a value can raise too (an unknown VR, say)
    except UnusableElement as exc:  # names the element, not its value
        log.debug("cannot check an upload: %s", exc)
        return f"inconsistent DICOM attributes ({exc})"
    except OSError as exc:  # reading a deferred value or the end of the file
        return Unreadable(exc)
    except Exception as exc:  # anything else: its type and where, never its message
        log.debug("cannot check an upload: %s", describe(exc))
        return f"inconsistent DICOM attributes ({type(exc).__name__})"


def _read_if_small(path: Path) -> tuple[bytes | None, int]:
    """The file's bytes (None if larger than ``_IN_MEMORY_MAX``) and its size."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size > _IN_MEMORY_MAX:
            return None, size
        data = f.readall()
    return data, len(data)


def _element_end(elem: object) -> int | None:
    """File offset just past a top-level element, when the raw element tells it."""
    if not isinstance(elem, RawDataElement) or elem.value_tell is None:
        return None
    if elem.length != _UNDEFINED_LENGTH:
        return elem.value_tell + elem.length
    if isinstance(elem.value, bytes):
        return elem.value_tell + len(elem.value) + 8  # + the sequence delimitation item
    return None


def _layout_problem(ds: pydicom.Dataset, size: int, tail_of: Callable[[int], bytes]) -> str | None:
    """Top-level elements out of order or repeated, an element that runs past the end, or bytes
    after the last one that are not padding; ``tail_of(n)``: the file's last ``n`` bytes.

    Order: pydicom keeps the last copy of a repeated element and a server may keep the first
    (Orthanc does): the mount and the server would disagree on the file's UIDs. In tag order,
    each element must start after the one before, right after it (a header is 8 or 12 bytes)
    when that one's end is known; a repeated element leaves a gap there (its other copy) or
    comes back later in the file."""
    if _syntax_is(ds, "is_deflated"):
        return None  # offsets refer to the inflated stream; zlib reports truncation itself
    tags = sorted(ds.keys())
    if tags and tags[0] == 0:
        # Zero bytes after the data set (a file padded to a block size by an archiver or a CD
        # writer) read as empty (0000,0000) elements; a server takes such a file.
        padded_end = _zero_padding_start(ds, tags[1:], size, tail_of)
        if padded_end is None:
            return ("bytes after the DICOM data set that are neither elements nor zero padding (of at most 1 MiB): "
                    "a corrupt file?")
        tags, size = tags[1:], padded_end
    if not tags:
        return "no readable data set after the file meta information (truncated?)"
    ends: list[int | None] = []  # per element in tag order; None when its end is unknown
    previous_tell = -1
    for elem in _raw_items(ds, tags):
        if isinstance(elem, RawDataElement) and elem.value_tell is not None:
            previous_end = ends[-1] if ends else None
            if elem.value_tell <= previous_tell or (previous_end is not None
                                                    and elem.value_tell - previous_end > _LONGEST_HEADER):
                return "DICOM elements out of order or repeated (the file's identity would be ambiguous)"
            previous_tell = elem.value_tell
        ends.append(_element_end(elem))
    known = [end for end in ends if end is not None]
    if known and max(known) > size:
        return "truncated DICOM file: an element runs past the end of the file"
    if ends[-1] is None:
        return None  # an undefined-length last element: pydicom drops it if its delimiter is missing
    tail = size - max(known)
    if tail and (tail >= 8 or any(tail_of(tail))):
        return "truncated DICOM file: the last element is incomplete"
    return None


def _zero_padding_start(ds: pydicom.Dataset, tags: list[BaseTag], size: int,
                        tail_of: Callable[[int], bytes]) -> int | None:
    """Where the zero padding after the data set starts: the end of its last element, when every
    byte from there to the end of the file (at most ``_PADDING_MAX``) is zero; else None."""
    ends = [_element_end(elem) for elem in _raw_items(ds, tags)]
    if not ends or ends[-1] is None:
        return None
    end = max(e for e in ends if e is not None)
    if not 0 < size - end <= _PADDING_MAX or any(tail_of(size - end)):
        return None
    return end


def _syntax_is(ds: pydicom.Dataset, prop: str) -> bool | None:
    """Whether the file's transfer syntax is deflated or encapsulated (``prop``: pydicom's
    ``is_deflated``, ``is_encapsulated``). None when the file has none, or pydicom does not know
    it: a newer one (JPEG XL, Deflated Image Frame Compression) or a private one. pydicom reads
    those as explicit VR little endian, as the standard has every transfer syntax after the
    first three; the server decides whether it takes them."""
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    if transfer_syntax is None:
        return None
    try:
        return bool(getattr(transfer_syntax, prop))
    except ValueError:  # "UID is not a transfer syntax"
        return None


def _raw_items(ds: pydicom.Dataset, tags: list[BaseTag]) -> Iterator[object]:
    return (ds.get_item(tag, keep_deferred=True) for tag in tags)


def _read_tail(path: Path, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(-count, os.SEEK_END)
        return f.read()


def _pixel_data_problem(ds: pydicom.Dataset) -> str | None:
    """Pixel data that an image needs but lacks, or native (not encapsulated) pixel data
    shorter than Rows × Columns × … says. A file cut at an element boundary parses cleanly;
    for images this is what tells it apart."""
    if "PixelData" not in ds:
        return _missing_pixel_data_problem(ds)
    raw = ds.get_item("PixelData", keep_deferred=True)
    if _syntax_is(ds, "is_encapsulated") is not False or raw is None:
        return None  # compressed, or a transfer syntax not known here: its length tells nothing
    length = raw.length if isinstance(raw, RawDataElement) else len(raw.value or b"")
    if length != _UNDEFINED_LENGTH and length < _expected_pixel_bytes(ds):
        return "pixel data is shorter than the image attributes say"
    return None


def _missing_pixel_data_problem(ds: pydicom.Dataset) -> str | None:
    if any(keyword in ds for keyword in _OTHER_PIXEL_SOURCES):
        return None
    if any(keyword in ds for keyword in _IMAGE_PIXEL_ATTRIBUTES):
        return "image attributes but no pixel data (truncated?)"
    sop_class = _value(ds, "SOPClassUID")
    if "Image Storage" in str(getattr(sop_class, "name", "")):
        return "an image SOP class but no pixel data (truncated?)"
    return None


def _expected_pixel_bytes(ds: pydicom.Dataset) -> int:
    samples = _number(ds, "SamplesPerPixel", 1) or 1
    frames = _number(ds, "NumberOfFrames", 1) or 1
    bits = _number(ds, "BitsAllocated") * _number(ds, "Rows") * _number(ds, "Columns") * samples * frames
    expected = -(-bits // 8)
    if _value(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        expected = expected * 2 // 3  # chroma subsampled in native data
    return expected
