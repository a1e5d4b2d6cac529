"""Every option, declared once: name, short flag, default, help and group, validated by pydantic.

The names and short flags are the original DICOMFuse's (a user switches by changing one
command); the CLI's argparse parser is generated from this model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Numbers as typed in ASCII: str.isdigit() and int() also take other scripts' digits (٣) and
# superscripts (², which int() then refuses with a message of its own).
_WHOLE = re.compile(r"[0-9]+")
_INTEGER = re.compile(r"[-+]?[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
_DRIVE = re.compile(r"[A-Za-z]:")  # a Windows drive letter as --mountPath
MAX_HTTP_TIMEOUT_S = 86400


def parse_http_timeout(value: str) -> tuple[float, float]:
    """``--httpTimeout``: ``C,R`` or one number for both, in seconds (ValueError saying why)."""
    parts = [p.strip() for p in value.split(",")]
    if not all(_DECIMAL.fullmatch(p) for p in parts):  # not float(): it takes inf, nan, 1e3, ٣
        raise ValueError("expected seconds like 10,60 (connect,read) or one number for both")
    numbers = [float(p) for p in parts]
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or min(numbers) <= 0:
        raise ValueError("expected two positive numbers of seconds like 10,60")
    if max(numbers) > MAX_HTTP_TIMEOUT_S:  # the OS takes no socket timeout past ~9e9 s
        raise ValueError(f"at most {MAX_HTTP_TIMEOUT_S} seconds (a day) each")
    return (numbers[0], numbers[1])


TRUE = {"true", "yes", "on", "1"}
FALSE = {"false", "no", "off", "0"}


def opt(default: Any, help: str, *, short: str | None = None, group: str = "Mount options",
        metavar: str | None = None, required: bool = False) -> Any:
    extra: dict[str, Any] = {"group": group}
    if short:
        extra["short"] = short
    if metavar:
        extra["metavar"] = metavar
    if required:
        return Field(..., description=help, json_schema_extra=extra)
    return Field(default, description=help, json_schema_extra=extra)


class Settings(BaseModel):
    """The one settings object that flows down from the CLI."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    datasetAddr: str = opt(
        None, "Address of the dataset: a Cloud Healthcare API dataset "
        "(https://healthcare.googleapis.com/v1/projects/P/locations/L/datasets/D), any DICOMweb "
        "root (http://host:8042/dicom-web) or a local folder of DICOM files.",
        short="-a", metavar="ADDRESS", required=True)
    mountPath: Path = opt(
        None, "Where to mount the dataset: an empty folder on Linux and macOS (e.g. /home/user/dicom); "
        "a free drive letter (e.g. J:) or a new or empty folder on Windows.",
        short="-p", metavar="PATH", required=True)
    cacheTime: tuple[int, int] = opt(
        (60, 300), "Seconds to keep folder listings in RAM and opened instances on disk, "
        "as LISTINGS,INSTANCES.", short="-t", metavar="L,I", group="Caching")
    cacheSize: int = opt(
        10000, "Largest size in MB of the instance cache on disk; the largest file that can be "
        "read or uploaded is cacheSize/4.", short="-s", metavar="MB", group="Caching")
    enableDeletion: bool = opt(
        True, "Allow deleting instances and stores (true|false). With false, rm answers "
        "'Operation not permitted'.", short="-d", metavar="BOOL")
    keyFile: Path | None = opt(
        None, "Service account key (JSON) for the Cloud Healthcare API; default: application "
        "default credentials.", short="-k", metavar="FILE", group="Credentials")
    extraMountOptions: str | None = opt(
        None, "Comma-separated mount options merged over this OS's defaults, e.g. "
        "allow_other,max_read=131072.", metavar="OPTS")
    orthancRest: str = opt(
        "auto", "Orthanc's REST API, used for delete and for sizes in listings: auto (detected), "
        "off, or its URL.", metavar="auto|off|URL", group="DICOMweb servers")
    downloadThreads: int = opt(
        16, "Parallel downloads of instances (files asked for first, then read-ahead).", metavar="N",
        group="Performance")
    readAhead: int = opt(
        16, "Files of a series fetched ahead when a program reads it in order (cp -r, tar, rsync, "
        "viewers); 0 turns read-ahead off.", metavar="N", group="Performance")
    uploadMode: str = opt(
        "sync", "sync: a copy into the mount ends when the server has stored the file (errors "
        "fail the copy); writeback: the file is checked, kept safely on disk and uploaded in the "
        "background in parallel batches (see 'dicomfuse status').", metavar="sync|writeback",
        group="Performance")
    httpTimeout: tuple[float, float] = opt(
        (10.0, 60.0), "Seconds to wait for a server: to connect, and between two bytes of an answer. "
        "A server silent for longer is asked once more, then gives Input/output error.", metavar="C,R",
        group="Advanced")
    caBundle: Path | None = opt(
        None, "PEM file of the certificate authorities to trust for https (a private CA); TLS "
        "verification is always on.", metavar="FILE", group="Credentials")
    cacheDir: Path | None = opt(
        None, "Folder for the private instance cache and upload spool (default: the user cache "
        "folder).", metavar="DIR", group="Advanced")
    logDir: Path | None = opt(
        None, "Folder for the DEBUG/INFO/ERROR log files (default: the user log folder).",
        metavar="DIR", group="Advanced")

    @field_validator("datasetAddr")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("cacheTime", mode="before")
    @classmethod
    def _cache_time(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            if len(parts) != 2 or not all(_WHOLE.fullmatch(p) for p in parts):
                raise ValueError("expected two whole numbers of seconds like 60,300")
            return (int(parts[0]), int(parts[1]))
        return value

    @field_validator("httpTimeout", mode="before")
    @classmethod
    def _http_timeout(cls, value: Any) -> Any:
        return parse_http_timeout(value) if isinstance(value, str) else value

    @field_validator("mountPath")
    @classmethod
    def _mount_path(cls, value: Path) -> Path:
        """As the other paths (``--mountPath=~/dicom``: the shell leaves that ``~`` alone), but a
        Windows drive letter stays one."""
        if _DRIVE.fullmatch(str(value)):
            return value
        return value.expanduser().absolute()

    @field_validator("keyFile", "caBundle", "cacheDir", "logDir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Relative to where the command was typed: the mounted process runs in another
        folder (libfuse moves it to /), where a relative path would name nothing."""
        return None if value is None else value.expanduser().absolute()

    @field_validator("caBundle")
    @classmethod
    def _ca_bundle(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("cacheSize", "downloadThreads", "readAhead", mode="before")
    @classmethod
    def _whole_number(cls, value: Any, info: ValidationInfo) -> Any:
        """As typed in ASCII (int() also takes ١٠٠٠), with what the number counts in the message."""
        if isinstance(value, str):
            if not _INTEGER.fullmatch(value.strip()):  # a sign passes: the range check says what fits
                raise ValueError("expected a whole number of megabytes, like 10000" if info.field_name == "cacheSize"
                                 else "expected a whole number, like 8")
            return int(value.strip())
        return value

    @field_validator("cacheSize")
    @classmethod
    def _cache_size(cls, value: int) -> int:
        if value < 4:
            raise ValueError("must be at least 4 (MB)")
        return value

    @field_validator("orthancRest")
    @classmethod
    def _orthanc_rest(cls, value: str) -> str:
        value = value.strip()
        if value.lower() in ("auto", "off"):
            return value.lower()
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected auto, off or an http(s):// URL")
        return value.rstrip("/")

    @field_validator("downloadThreads")
    @classmethod
    def _threads(cls, value: int) -> int:
        if not 1 <= value <= 64:
            raise ValueError("must be between 1 and 64")
        return value

    @field_validator("readAhead")
    @classmethod
    def _read_ahead(cls, value: int) -> int:
        if not 0 <= value <= 256:
            raise ValueError("must be between 0 and 256")
        return value

    @field_validator("uploadMode")
    @classmethod
    def _upload_mode(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("sync", "writeback"):
            raise ValueError("expected sync or writeback")
        return value

    @field_validator("enableDeletion", mode="before")
    @classmethod
    def _bool(cls, value: Any) -> Any:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in TRUE:
                return True
            if low in FALSE:
                return False
            raise ValueError("expected true or false")
        return value

    @model_validator(mode="after")
    def _times(self) -> Settings:
        if min(self.cacheTime) < 0:
            raise ValueError("cacheTime: seconds cannot be negative")
        return self

    @property
    def cache_bytes(self) -> int:
        return self.cacheSize * 1024 * 1024
