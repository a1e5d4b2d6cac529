"""SecurityDescriptor of winfspy 0.8.4 (plumbing/security_descriptor.py): a NamedTuple
``(handle, size)``; ``from_string`` converts SDDL with ConvertStringSecurityDescriptorTo…W."""

from __future__ import annotations

from typing import Any, NamedTuple


class SecurityDescriptor(NamedTuple):
    handle: Any
    size: int

    @classmethod
    def from_cpointer(cls, handle: Any) -> SecurityDescriptor:
        if handle is None:
            return cls(None, 0)
        return cls(handle, len(handle) if isinstance(handle, (bytes, str)) else 0)  # GUESS: no C pointer here

    @classmethod
    def from_string(cls, string_format: str) -> SecurityDescriptor:
        if not string_format.startswith(("O:", "G:", "D:", "S:")):
            # Real: RuntimeError("Cannot create security descriptor `...`: ...") from Windows' parser.
            raise RuntimeError(f"Cannot create security descriptor `{string_format}`")
        # GUESS: a self-relative binary descriptor in the real one; its SDDL text here, and the
        # size that text has in UTF-16 (the real size is the binary length).
        return cls(string_format, 2 * len(string_format))

    def to_string(self) -> str:
        return str(self.handle)  # GUESS: Windows may reorder or normalise the SDDL it gives back

    def evolve(self, security_information: int, modification_descriptor: Any) -> SecurityDescriptor:
        return self  # GUESS: the real one applies FspSetSecurityDescriptor

    def is_valid(self) -> bool:
        return isinstance(self.handle, str)
