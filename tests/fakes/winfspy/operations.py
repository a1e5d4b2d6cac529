"""BaseFileSystemOperations of winfspy 0.8.4 (operations.py): the high-level methods a file
system overrides, with the real signatures.

In the real class each method has an ``ll_*`` twin that WinFsp's C side calls through cffi: it
converts the C arguments, calls the method, turns ``NTStatusError`` into its ``value`` and any
other exception into STATUS_UNEXPECTED_IO_ERROR (``_catch_unhandled_exceptions``), and after
create, open, overwrite, write, flush and set_file_size fills the FileInfo from
``get_file_info``. The twins take C pointers and are not reproduced here; the Explorer replay
(tests/replay/explorer.py) plays their part with Python values.
"""

from __future__ import annotations

from typing import Any


class BaseFileContext:
    pass


class BaseFileSystemOperations:
    def __init__(self) -> None:
        self._opened_objs: dict[Any, Any] = {}

    def get_volume_info(self) -> dict:
        """Dict fields: total_size, free_size, volume_label (at most 64 bytes in UTF-16)."""
        raise NotImplementedError()

    def set_volume_label(self, volume_label: str) -> None:
        raise NotImplementedError()

    def get_security_by_name(self, file_name):  # type: ignore[no-untyped-def]
        """Returns: (file_attributes, security_descriptor, security_descriptor_size)"""
        raise NotImplementedError()

    def create(self, file_name, create_options, granted_access, file_attributes, security_descriptor,  # type: ignore[no-untyped-def]
               allocation_size) -> BaseFileContext:
        raise NotImplementedError()

    def open(self, file_name, create_options, granted_access) -> BaseFileContext:  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def overwrite(self, file_context, file_attributes, replace_file_attributes: bool,  # type: ignore[no-untyped-def]
                  allocation_size: int) -> None:
        raise NotImplementedError()

    def cleanup(self, file_context, file_name, flags) -> None:  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def close(self, file_context) -> None:  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def read(self, file_context, offset: int, length: int) -> bytes:  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def write(self, file_context, buffer, offset, write_to_end_of_file, constrained_io):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def flush(self, file_context) -> None:  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def get_file_info(self, file_context) -> dict:  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def set_basic_info(self, file_context, file_attributes, creation_time, last_access_time,  # type: ignore[no-untyped-def]
                       last_write_time, change_time, file_info) -> dict:
        raise NotImplementedError()

    def set_file_size(self, file_context, new_size, set_allocation_size) -> None:  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def can_delete(self, file_context, file_name: str) -> None:  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def rename(self, file_context, file_name: str, new_file_name: str, replace_if_exists: bool):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def get_security(self, file_context):  # type: ignore[no-untyped-def]
        """Returns: (security_descriptor, security_descriptor_size)"""
        raise NotImplementedError()

    def set_security(self, file_context, security_information, modification_descriptor):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def read_directory(self, file_context, marker: str) -> list[dict]:  # type: ignore[no-untyped-def]
        """Info dicts of the direct children, "." and ".." only for a folder that is not the
        root, consistently sorted; only names greater than (not equal to) ``marker`` (None: all)."""
        raise NotImplementedError()

    def resolve_reparse_points(self, file_name, reparse_point_index, resolve_last_path_component,  # type: ignore[no-untyped-def]
                               p_io_status, buffer, p_size):
        raise NotImplementedError()

    def get_reparse_point(self, file_context, file_name, buffer, p_size):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def set_reparse_point(self, file_context, file_name, buffer, size):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def delete_reparse_point(self, file_context, file_name, buffer, size):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def get_stream_info(self, file_context, buffer, length, p_bytes_transferred):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def get_dir_info_by_name(self, file_context, file_name: str) -> dict:  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def control(self, file_context, control_code, input_buffer, input_buffer_length, output_buffer,  # type: ignore[no-untyped-def]
                output_buffer_length, p_bytes_transferred):
        raise NotImplementedError()

    def set_delete(self, file_context, file_name: str, delete_file: bool):  # type: ignore[no-untyped-def]
        """If not overridden, WinFsp falls back on ``can_delete`` and never calls this."""
