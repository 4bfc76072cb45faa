"""Look at a library file before ``dlopen`` touches it.

``dlopen`` maps the file and trusts its headers: a truncated library kills
the process with SIGBUS, a foreign one may run its constructors. Before
loading we read the ELF header and the section table ourselves and refuse,
in one line, a file that:

* is not a 64-bit little-endian ELF shared object;
* is shorter than its own section table says (``e_shoff + e_shnum *
  e_shentsize``) or than any of its sections (a truncated copy);
* does not export ``__tvm_ffi__library_bin`` (the TVM module blob) holding a
  ``_metadata`` function (not built by ``mlc-vision compile``).

Only ELF (``.so``) is checked; ``.dylib`` / ``.dll`` go to the loader as they are.
Pure Python, runtime-only: no TVM import.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import MlcVisionError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, ET_DYN = 2, 1, 3
SHT_NOBITS, SHT_DYNSYM = 8, 11
BLOB_SYMBOL = b"__tvm_ffi__library_bin"
METADATA_FUNCTION = b"_metadata"

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym


def _refuse(lib: Path, why: str) -> MlcVisionError:
    return MlcVisionError(f"library {lib} {why}")


def _sections(data: bytes, lib: Path) -> list[tuple]:
    if len(data) < _EHDR.size or data[:4] != ELF_MAGIC:
        raise _refuse(lib, "is not an ELF shared library (no ELF header)")
    ident, e_type, _, _, _, _, e_shoff, _, _, _, _, e_shentsize, e_shnum, _ = _EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or e_type != ET_DYN:
        raise _refuse(lib, "is not a 64-bit little-endian ELF shared library")
    if e_shentsize != _SHDR.size or e_shoff + e_shnum * e_shentsize > len(data):
        raise _refuse(lib, f"is truncated or corrupt: its section table ends past its {len(data)} bytes")
    sections = [_SHDR.unpack_from(data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    for _, sh_type, _, _, offset, size, *_ in sections:
        if sh_type != SHT_NOBITS and offset + size > len(data):
            raise _refuse(lib, f"is truncated or corrupt: a section ends past its {len(data)} bytes")
    return sections


def _symbol_bytes(data: bytes, sections: list[tuple], name: bytes) -> bytes | None:
    """The bytes a dynamic symbol points at, or None when it is not exported."""
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != SHT_DYNSYM or entsize != _SYM.size or link >= len(sections):
            continue
        strtab_offset, strtab_size = sections[link][4], sections[link][5]
        for index in range(size // entsize):
            st_name, _, _, _, value, sym_size = _SYM.unpack_from(data, offset + index * entsize)
            start = strtab_offset + st_name
            if st_name < strtab_size and data[start : start + len(name) + 1] == name + b"\0":
                return _bytes_at(data, sections, value, sym_size)
    return None


def _bytes_at(data: bytes, sections: list[tuple], address: int, size: int) -> bytes:
    for _, sh_type, _, sh_addr, offset, sh_size, *_ in sections:
        if sh_type != SHT_NOBITS and sh_addr <= address and address + size <= sh_addr + sh_size:
            return data[offset + address - sh_addr : offset + address - sh_addr + size]
    return b""


def check_library_file(lib: str | Path) -> None:
    """Raise a one-line :class:`MlcVisionError` unless ``lib`` is a whole mlc-vision ELF library."""
    lib = Path(lib)
    if lib.suffix != ".so":
        return
    try:
        data = lib.read_bytes()
    except OSError as err:
        raise _refuse(lib, f"cannot be read: {err.strerror or err}") from None
    sections = _sections(data, lib)
    blob = _symbol_bytes(data, sections, BLOB_SYMBOL)
    if blob is None:
        raise _refuse(lib, "is not a TVM library (no __tvm_ffi__library_bin); was it built by mlc-vision compile?")
    if METADATA_FUNCTION not in blob:
        raise _refuse(lib, "has no mlc-vision _metadata(); was it built by mlc-vision compile?")
