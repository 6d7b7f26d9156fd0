"""A GGUF file's header (version, key/value metadata, tensor infos) in plain Python: the one reader
of llama.cpp's container that `herd.model` (weights) and `herd.tokenizer` (vocabularies) share.

Trade-off: `gguf.GGUFReader` builds a numpy view per value, one per string of a vocabulary, which
takes about 2.5 s for SmolLM2's 49k tokens and 48k merges and several times that for Llama 3's
128k vocabulary. Walking the same bytes of a memory map with `struct` takes a few hundredths of a
second. The price is a second reader of the format to keep right, so the tests compare it with
`GGUFReader` on every value type. Only the header is read here; the tensor data is the caller's
to map, because its size depends on the GGML types' block sizes, which live in the `gguf` package
(an optional dependency this layer does not import). Little-endian GGUF v2/v3 only: what llama.cpp
writes, and all GGUFReader reads without byte-swapping.

Why a module of its own beside `herd/io.py` rather than inside it: io.py is the cache folder and the
atomic writes every package uses; this parses one file format, needed by two packages that may
not import each other (the tokenizer may not import the model). Like io.py it imports nothing
from herd, and the import-graph test lets every package import either.

Layout (llama.cpp's docs/gguf.md): "GGUF", u32 version, u64 tensor count, u64 key/value count;
each key/value is a string key, a u32 value type and the value (strings are a u64 byte length and
UTF-8 bytes; arrays a u32 item type, a u64 count and the items); each tensor info is a string
name, u32 dimension count, u64 dimensions (innermost first), u32 GGML type and u64 offset relative
to the data section, which starts at the end of the header rounded up to `general.alignment`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 had 32-bit counts and is long gone; llama.cpp writes v3
DEFAULT_ALIGNMENT = 32

# Value type id -> name (gguf.GGUFValueType's names, lower case) and the struct code of a scalar.
TYPE_NAMES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array",
              "uint64", "int64", "float64")
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SIZES = {t: struct.calcsize(f"<{c}") for t, c in _SCALARS.items()}
_UINT32, _STRING, _ARRAY = 4, 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as the header lists it.

    type: GGML type id (`gguf.GGMLQuantizationType(type)` names it); dims: as stored, innermost
    first (a torch shape is `dims` reversed); offset: absolute byte position of the tensor's first
    byte in the file (the data start plus the relative offset the header stores).
    """

    name: str
    type: int
    dims: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class GGUFHeader:
    """What `read_gguf_header` found.

    metadata: key -> plain Python value (int, float, bool, str, or a list of them; arrays of arrays
        stay nested), in file order, only the keys that were asked for.
    types: key -> value type names of each kept key: ("uint32",), ("array", "string"); an array's
        second name is its declared item type (("array", "array") for arrays of arrays).
    tensors: the tensor infos in file order (always all of them).
    alignment: `general.alignment` (default 32); data_start: where the tensor data begins.
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    types: dict[str, tuple[str, ...]]
    tensors: tuple[GGUFTensorInfo, ...]
    alignment: int
    data_start: int
    file_size: int


def read_gguf_header(path: str | os.PathLike[str], *, prefixes: tuple[str, ...] | None = None) -> GGUFHeader:
    """Read a GGUF file's header; keep the metadata keys that start with one of `prefixes` (None: all).

    Values of other keys are stepped over without being decoded. Raises FileNotFoundError for a
    missing file and ValueError for a directory, a file that is not GGUF, a big-endian or
    unsupported version, or a header that is truncated or malformed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the .gguf file itself")
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(MAGIC):  # mmap refuses empty files
            return _Parser(f.read(), path, prefixes).header()
        # A memory map reads only the header's pages, however large the file, and parses in one pass.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Parser(data, path, prefixes).header()


class _Parser:
    def __init__(self, data: bytes | mmap.mmap, path: Path, prefixes: tuple[str, ...] | None) -> None:
        self.data, self.pos, self.end, self.path = data, 0, len(data), path
        self.prefixes = prefixes
        self.where = "the file header"  # named in a truncation error

    def header(self) -> GGUFHeader:
        data, path = self.data, self.path
        if data[:4] != MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it starts with {bytes(data[:4])!r}, not {MAGIC!r})")
        self.pos = 4
        version = self.u32()
        if version not in VERSIONS:
            swapped = struct.unpack_from(">I", data, 4)[0]
            if swapped in VERSIONS:
                raise ValueError(
                    f"{path} is a big-endian GGUF file (version {swapped}); herd reads little-endian files only. "
                    "Convert it with the gguf package's gguf-convert-endian script"
                )
            raise ValueError(
                f"{path}: GGUF version {version} is not supported; herd reads versions "
                f"{' and '.join(map(str, VERSIONS))} (re-convert the model with a current llama.cpp)"
            )
        n_tensors, n_kv = self.u64(), self.u64()
        metadata: dict[str, Any] = {}
        types: dict[str, tuple[str, ...]] = {}
        alignment, seen = DEFAULT_ALIGNMENT, set()
        for i in range(n_kv):
            self.where = f"metadata entry {i}"
            key = self.name("key")
            if key in seen:
                raise ValueError(f"{path} is corrupt: metadata key {key!r} appears twice")
            seen.add(key)
            self.where = f"the value of {key!r}"
            vtype = self.u32()
            # general.alignment places the tensor data, so it is read even when not kept.
            keep = self.prefixes is None or key.startswith(self.prefixes) or key == "general.alignment"
            value, names = self.value(vtype) if keep else (self.skip(vtype), ())
            if key == "general.alignment":
                alignment = self._alignment(value, names)
                keep = self.prefixes is None or key.startswith(self.prefixes)
            if keep:
                metadata[key], types[key] = value, names
        tensors, names_seen = [], set()
        for i in range(n_tensors):
            self.where = f"tensor info {i}"
            name = self.name("tensor name")
            if name in names_seen:
                raise ValueError(f"{path} is corrupt: tensor {name!r} appears twice")
            names_seen.add(name)
            n_dims = self.u32()
            self.need(8 * n_dims)
            dims = struct.unpack_from(f"<{n_dims}Q", data, self.pos)
            self.pos += 8 * n_dims
            ggml_type, offset = self.u32(), self.u64()
            tensors.append(GGUFTensorInfo(name=name, type=ggml_type, dims=tuple(dims), offset=offset))
        data_start = -(-self.pos // alignment) * alignment
        tensors = [GGUFTensorInfo(t.name, t.type, t.dims, data_start + t.offset) for t in tensors]
        return GGUFHeader(path=path, version=version, metadata=metadata, types=types, tensors=tuple(tensors),
                          alignment=alignment, data_start=data_start, file_size=self.end)

    def _alignment(self, value: Any, names: tuple[str, ...]) -> int:
        if names != ("uint32",) or value == 0 or value & (value - 1):
            shown = f"{value!r} ({names[0] if names else '?'})"
            raise ValueError(
                f"{self.path} is corrupt: general.alignment is {shown}; GGUF needs a uint32 power of two"
            )
        return int(value)

    # ---- primitives ------------------------------------------------------------------------

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise self._truncated()

    def _truncated(self) -> ValueError:
        return ValueError(
            f"{self.path} is truncated or corrupt: its GGUF header runs past the end of the file "
            f"({self.end} bytes) in {self.where}; re-download or re-convert the file"
        )

    def u32(self) -> int:
        self.need(4)
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        self.need(8)
        (value,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return value

    def name(self, what: str) -> str:
        """A key or tensor name: UTF-8 by the spec, and an error rather than a guess when it is not."""
        length = self.u64()
        self.need(length)
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path} is corrupt: a {what} ({raw[:40]!r}) is not UTF-8") from None

    def strings(self, n: int) -> list[str]:
        # The hot loop of a vocabulary (hundreds of thousands of strings): locals only.
        data, pos, end = self.data, self.pos, self.end
        unpack, out = _U64.unpack_from, []
        for _ in range(n):
            if pos + 8 > end:
                raise self._truncated()
            (length,) = unpack(data, pos)
            pos += 8
            # llama.cpp vocabularies may hold bytes that are not UTF-8 (rare); keep them lossless.
            out.append(data[pos : pos + length].decode("utf-8", errors="surrogateescape"))
            pos += length
        if pos > end:
            raise self._truncated()
        self.pos = pos
        return out

    def skip_strings(self, n: int) -> None:
        data, pos, end, unpack = self.data, self.pos, self.end, _U64.unpack_from
        for _ in range(n):
            if pos + 8 > end:
                raise self._truncated()
            pos += 8 + unpack(data, pos)[0]
        if pos > end:
            raise self._truncated()
        self.pos = pos

    def value(self, vtype: int) -> tuple[Any, tuple[str, ...]]:
        """The value of type `vtype` at the current position, and its type names."""
        if vtype in _SCALARS:
            self.need(_SIZES[vtype])
            (value,) = struct.unpack_from(f"<{_SCALARS[vtype]}", self.data, self.pos)
            self.pos += _SIZES[vtype]
            return value, (TYPE_NAMES[vtype],)
        if vtype == _STRING:
            return self.strings(1)[0], ("string",)
        if vtype == _ARRAY:
            itype, n = self.u32(), self.u64()
            names = ("array", self._type_name(itype))
            if itype in _SCALARS:
                self.need(n * _SIZES[itype])
                values = list(struct.unpack_from(f"<{n}{_SCALARS[itype]}", self.data, self.pos))
                self.pos += n * _SIZES[itype]
                return values, names
            if itype == _STRING:
                return self.strings(n), names
            return [self.value(itype)[0] for _ in range(n)], names
        raise self._unknown(vtype)

    def skip(self, vtype: int) -> None:
        """Step over a value without decoding it."""
        if vtype in _SCALARS:
            self.need(_SIZES[vtype])
            self.pos += _SIZES[vtype]
        elif vtype == _STRING:
            self.skip_strings(1)
        elif vtype == _ARRAY:
            itype, n = self.u32(), self.u64()
            if itype in _SCALARS:
                self.need(n * _SIZES[itype])
                self.pos += n * _SIZES[itype]
            elif itype == _STRING:
                self.skip_strings(n)
            else:
                self._type_name(itype)
                for _ in range(n):  # arrays of arrays: each item's count is in front of it
                    self.skip(itype)
        else:
            raise self._unknown(vtype)

    def _type_name(self, vtype: int) -> str:
        if not 0 <= vtype < len(TYPE_NAMES):
            raise self._unknown(vtype)
        return TYPE_NAMES[vtype]

    def _unknown(self, vtype: int) -> ValueError:
        return ValueError(
            f"{self.path} is corrupt or newer than herd: unknown GGUF value type {vtype} at byte {self.pos} "
            f"({self.where})"
        )
