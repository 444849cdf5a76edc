"""The safetensors format, written and read by hand (no torch, no safetensors package).

A file is: an 8-byte little-endian header length N, N bytes of JSON header, then the raw
little-endian tensor data. The header maps each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the start of the data) plus an optional
``"__metadata__"`` of strings. The writer sorts names, packs tensors back to back in that order
and pads the header with spaces to a multiple of 8 bytes, so equal inputs give equal bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import LlmfleetError

#: safetensors dtype name -> (numpy little-endian dtype of the stored bits, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BF16": ("<u2", 2),  # bfloat16 has no numpy dtype: its raw bits are kept as uint16
    "F16": ("<f2", 2),
    "F32": ("<f4", 4),
    # raw bytes: packed 4-bit values (NVFP4 weights) and fp8 scales are stored as their bit patterns
    "U8": ("<u1", 1),
    "F8_E4M3": ("<u1", 1),
    # read (header checks) but never written here
    "F8_E5M2": ("<u1", 1),
    "I8": ("<i1", 1),
    "BOOL": ("<u1", 1),
    "I16": ("<i2", 2),
    "U16": ("<u2", 2),
    "I32": ("<i4", 4),
    "U32": ("<u4", 4),
    "I64": ("<i8", 8),
    "U64": ("<u8", 8),
    "F64": ("<f8", 8),
}
#: config.json's ``torch_dtype`` name -> safetensors dtype name
TORCH_DTYPES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
MAX_HEADER = 100 * 1024 * 1024  # what the reference implementation accepts


class SafetensorsError(LlmfleetError):
    """A safetensors file or tensor that breaks the format."""


def bfloat16_bits(values: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """float32 -> bfloat16 bit patterns, rounding to nearest, ties to even.

    Adds 0x7FFF plus the lowest kept bit to the float32 bits and keeps the upper 16: exact
    halves round towards an even mantissa, overflow rounds to infinity. NaN stays a quiet NaN
    with its sign (plain rounding could turn a NaN with low payload bits into infinity).
    """
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        sign = ((bits >> 16) & 0x8000).astype(np.uint16)
        rounded = np.where(nan, sign | np.uint16(0x7FC0), rounded).astype(np.uint16)
    return rounded


def bfloat16_to_float32(bits: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """bfloat16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode(values: npt.NDArray[Any], dtype: str) -> bytes:
    """The stored bytes of an array in safetensors dtype ``dtype``: floats for BF16, F16 and F32,
    bit patterns (0..255) for U8 and F8_E4M3."""
    if dtype in ("U8", "F8_E4M3"):
        return np.ascontiguousarray(values).astype("<u1").tobytes()
    if dtype == "BF16":
        return bfloat16_bits(values).astype("<u2").tobytes()
    if dtype in ("F16", "F32"):
        return np.ascontiguousarray(values, dtype=np.float32).astype(DTYPES[dtype][0]).tobytes()
    raise SafetensorsError(f"dtype {dtype!r} cannot be written (valid: BF16, F16, F32, U8, F8_E4M3)")


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: name, dtype, shape and the byte range within the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def serialize(
    tensors: Mapping[str, npt.NDArray[Any]], dtype: str | Mapping[str, str], metadata: Mapping[str, str] | None = None
) -> bytes:
    """A whole safetensors file holding ``tensors`` (name -> array), every one in ``dtype`` (or, given
    a mapping, each in its own: name -> dtype)."""
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise SafetensorsError("a tensor may not be named __metadata__")
        kind = dtype if isinstance(dtype, str) else dtype[name]
        data = encode(tensors[name], kind)
        header[name] = {"dtype": kind, "shape": list(np.shape(tensors[name])), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def read_header(path: Path) -> tuple[dict[str, str], list[TensorInfo], int]:
    """Parse and check a file's header: (metadata, tensors in data order, data start offset).

    Refuses what the reference loader refuses: an oversized or non-JSON header, unknown
    dtypes, byte ranges that do not match the shape, and gaps, overlaps or trailing bytes.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"{path}: header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    infos = []
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: {name}: dtype {dtype!r} is not supported (valid: {', '.join(DTYPES)})")
        if end - begin != int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]:
            raise SafetensorsError(f"{path}: {name}: byte range {begin}..{end} does not hold shape {list(shape)} of {dtype}")
        infos.append(TensorInfo(name, dtype, shape, begin, end))
    infos.sort(key=lambda t: (t.begin, t.end))
    expected = 0
    for t in infos:
        if t.begin != expected:
            raise SafetensorsError(f"{path}: {t.name} starts at {t.begin}, expected {expected} (gap or overlap)")
        expected = t.end
    if 8 + n + expected != size:
        raise SafetensorsError(f"{path}: data section is {size - 8 - n} bytes, the header describes {expected}")
    return metadata, infos, 8 + n


def load(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Every tensor of a file as a numpy array (BF16 as its uint16 bits)."""
    _, infos, start = read_header(path)
    data = path.read_bytes()[start:]
    return {t.name: np.frombuffer(data[t.begin : t.end], dtype=DTYPES[t.dtype][0]).reshape(t.shape) for t in infos}
