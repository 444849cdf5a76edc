"""The hand-written safetensors format and bfloat16 rounding."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from llmfleet.artifacts import safetensors as st


def bits(value: int) -> np.ndarray:
    return np.array([value], dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize(
    ("f32_bits", "bf16_bits"),
    [
        (0x3F800000, 0x3F80),  # 1.0 is exact
        (0x3F808000, 0x3F80),  # exactly half-way, kept bit even: down
        (0x3F818000, 0x3F82),  # exactly half-way, kept bit odd: up to even
        (0x3F808001, 0x3F81),  # just above half: up
        (0x3F807FFF, 0x3F80),  # just below half: down
        (0xC0000000, 0xC000),  # -2.0
        (0x00000000, 0x0000),  # +0
        (0x80000000, 0x8000),  # -0 keeps its sign
        (0x00000001, 0x0000),  # smallest subnormal rounds to zero
        (0x00018000, 0x0002),  # subnormal tie, odd: up to even
        (0x7F800000, 0x7F80),  # +inf
        (0xFF800000, 0xFF80),  # -inf
        (0x7F7FFFFF, 0x7F80),  # float32 max is past bfloat16's max + half an ulp: infinity
        (0x7F7F7FFF, 0x7F7F),  # below the half-way point: bfloat16's max
        (0x7FC00000, 0x7FC0),  # quiet NaN
        (0x7F800001, 0x7FC0),  # signalling NaN with low payload stays NaN (plain rounding gives inf)
        (0xFFFFFFFF, 0xFFC0),  # negative NaN with all bits set keeps its sign, no overflow
    ],
)
def test_bfloat16_rounds_to_nearest_even(f32_bits: int, bf16_bits: int) -> None:
    assert int(st.bfloat16_bits(bits(f32_bits))[0]) == bf16_bits


def test_bfloat16_matches_a_reference_on_random_values() -> None:
    """Against a slow reference: the nearer of the two neighbouring bfloat16 values, ties to even."""
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    values = raw.view(np.float32)
    values = values[np.isfinite(values) & (np.abs(values) < 3.0e38)]
    got = st.bfloat16_bits(values)
    for v, g in zip(values, got, strict=True):
        b = int(np.array([v], dtype=np.float32).view(np.uint32)[0])
        lo, hi = b & 0xFFFF0000, (b & 0xFFFF0000) + 0x10000
        d_lo = abs(float(v) - float(bits(lo)[0]))
        d_hi = abs(float(v) - float(bits(hi)[0]))
        expected = (lo if d_lo < d_hi else hi) if d_lo != d_hi else (lo if not (lo >> 16) & 1 else hi)
        assert int(g) == expected >> 16


def test_bfloat16_back_to_float32_is_exact() -> None:
    values = np.concatenate([np.array([1.0, -2.5, 0.015625, -0.0], dtype=np.float32), bits(0x7F7F0000)])  # last: bf16 max
    assert np.array_equal(st.bfloat16_to_float32(st.bfloat16_bits(values)), values)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.weight": rng.standard_normal((7,)).astype(np.float32),
        "c.scalarish": np.ones((1, 1, 2), dtype=np.float32),
    }


@pytest.mark.parametrize(("dtype", "width"), [("BF16", 2), ("F16", 2), ("F32", 4)])
def test_header_parses_back(tmp_path: Path, dtype: str, width: int) -> None:
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    path.write_bytes(st.serialize(tensors, dtype, {"format": "pt"}))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0, "data must start 8-byte aligned"
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    # names sorted, packed back to back, ranges matching the shapes
    offset = 0
    for name in sorted(tensors):
        entry = header[name]
        size = int(np.prod(tensors[name].shape)) * width
        assert entry == {"dtype": dtype, "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    assert len(raw) == 8 + n + offset

    metadata, infos, start = st.read_header(path)
    assert metadata == {"format": "pt"} and start == 8 + n
    assert [t.name for t in infos] == sorted(tensors)
    loaded = st.load(path)
    for name, value in tensors.items():
        if dtype == "BF16":
            assert np.array_equal(loaded[name], st.bfloat16_bits(value))
        else:
            assert np.array_equal(loaded[name], value.astype(st.DTYPES[dtype][0]))


def test_equal_inputs_give_equal_bytes() -> None:
    assert st.serialize(_tensors(), "BF16") == st.serialize(dict(reversed(_tensors().items())), "BF16")


def _file(tmp_path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "data section"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "does not hold shape"),
        ({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "not supported"),
        (
            {"x": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, "y": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}},
            b"\0" * 6,
            "gap or overlap",
        ),
    ],
)
def test_read_header_refuses_broken_files(tmp_path: Path, header: dict, data: bytes, needle: str) -> None:
    with pytest.raises(st.SafetensorsError, match=needle):
        st.read_header(_file(tmp_path, header, data))


def test_read_header_refuses_a_header_longer_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(st.SafetensorsError, match="does not fit"):
        st.read_header(path)
