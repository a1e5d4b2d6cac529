"""FileSystem of winfspy 0.8.4 (file_system.py) that records instead of mounting.

The same constructor, checks and state machine: ``FileSystem(mountpoint, operations,
debug=False, **volume_params)``; unknown volume parameters fail as they do in the real
``_volume_params_factory`` (a TypeError); ``start``/``stop`` call the dispatcher functions of
``lib`` (recorded by the stand-in) and raise FileSystemAlreadyStarted/FileSystemNotStarted.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from .operations import BaseFileSystemOperations
from .plumbing import cook_ntstatus, lib, nt_success
from .plumbing.exceptions import FileSystemAlreadyStarted, FileSystemNotStarted, WinFSPyError


def _volume_params_factory(
    sector_size=0, sectors_per_allocation_unit=0, max_component_length=0, volume_creation_time=0,
    volume_serial_number=0, transact_timeout=0, irp_timeout=0, irp_capacity=0, file_info_timeout=0,
    case_sensitive_search=0, case_preserved_names=0, unicode_on_disk=0, persistent_acls=0,
    reparse_points=0, reparse_points_access_check=0, named_streams=0, hard_links=0,
    extended_attributes=0, read_only_volume=0, post_cleanup_when_modified_only=0,
    pass_query_directory_pattern=0, always_use_double_buffering=0, pass_query_directory_file_name=0,
    flush_and_purge_on_cleanup=0, device_control=0, um_file_context_is_user_context2=0,
    um_file_context_is_full_context=0, um_reserved_flags=0, allow_open_in_kernel_mode=0,
    case_preserved_extended_attributes=0, wsl_features=0, directory_marker_as_next_offset=0,
    reject_irp_prior_to_transact0=0, km_reserved_flags=0, prefix="", file_system_name="",
    volume_info_timeout_valid=0, dir_info_timeout_valid=0, security_timeout_valid=0,
    stream_info_timeout_valid=0, km_additional_reserved_flags=0, volume_info_timeout=0,
    dir_info_timeout=0, security_timeout=0, stream_info_timeout=0,
) -> dict[str, Any]:
    """Real: fills an FSP_FSCTL_VOLUME_PARAMS. Here: the complete parameter set, defaults included."""
    values = dict(locals())
    if len(file_system_name) >= 16:  # GUESS: FileSystemName is WCHAR[16]; the real one truncates or fails
        raise ValueError("file_system_name is longer than 15 characters")
    return values


VOLUME_PARAM_NAMES = frozenset(inspect.signature(_volume_params_factory).parameters)


class FileSystem:
    instances: ClassVar[list[FileSystem]] = []  # stand-in only: every FileSystem made, for the tests

    def __init__(self, mountpoint: str, operations: BaseFileSystemOperations, debug: bool = False,
                 **volume_params: Any) -> None:
        self.started = False
        if not isinstance(operations, BaseFileSystemOperations):
            raise ValueError("`operations` must be a `BaseFileSystemOperations` instance.")
        self.debug = debug
        self.volume_params = volume_params
        self.mountpoint = mountpoint
        self.operations = operations
        self._apply_volume_params()
        self._create_file_system()

    def _apply_volume_params(self) -> None:
        if self.volume_params.get("pass_query_directory_pattern", False):
            raise ValueError("The `pass_query_directory_pattern` mode is not supported at the moment")
        overridden = type(self.operations).get_dir_info_by_name is not BaseFileSystemOperations.get_dir_info_by_name
        if overridden and "pass_query_directory_file_name" not in self.volume_params:
            self.volume_params["pass_query_directory_file_name"] = True
        self._volume_params = _volume_params_factory(**self.volume_params)  # TypeError on an unknown name
        self.set_delete_available = type(self.operations).set_delete is not BaseFileSystemOperations.set_delete
        self._file_system_ptr = [object()]  # real: ffi.new("FSP_FILE_SYSTEM**")

    def _create_file_system(self) -> None:
        FileSystem.instances.append(self)

    def start(self) -> None:
        if self.started:
            raise FileSystemAlreadyStarted()
        self.started = True
        result = lib.FspFileSystemSetMountPoint(self._file_system_ptr[0], self.mountpoint)
        if not nt_success(result):
            raise WinFSPyError(f"Cannot mount file system: {cook_ntstatus(result).name}")
        result = lib.FspFileSystemStartDispatcher(self._file_system_ptr[0], 0)
        if not nt_success(result):
            raise WinFSPyError(f"Cannot start file system dispatcher: {cook_ntstatus(result).name}")
        # Real: then stats the mount point until it answers (WinFsp >= 1.12); nothing is mounted here.

    def restart(self, **volume_params: Any) -> None:
        self.stop()
        self.volume_params.update(volume_params)
        self._apply_volume_params()
        self._create_file_system()
        self.start()

    def stop(self) -> None:
        if not self.started:
            raise FileSystemNotStarted()
        self.started = False
        lib.FspFileSystemStopDispatcher(self._file_system_ptr[0])
        lib.FspFileSystemDelete(self._file_system_ptr[0])
