"""GGUF tensor data -> arrays for MLX: floats as they are, block quantizations repacked for MLX losslessly.

MLX's affine quantization stores, per group of `group_size` consecutive input values of a row, a scale `s`
and a bias `b`; the value is `s * q + b` with `q` an unsigned `bits`-bit integer, packed little-endian into
uint32 words (value i of a row at bits [i*bits, (i+1)*bits) of the row's bit stream). Several GGUF block
formats are exactly that with group size 32 (their blocks of 32 run along a row, i.e. along input features):

| GGUF | value | MLX bits | scale | bias |
| --- | --- | --- | --- | --- |
| Q8_0 | d * q, q in -128..127 | 8 | d | -128 d |
| Q4_0 | d * (q - 8) | 4 | d | -8 d |
| Q4_1 | d * q + m | 4 | d | m |
| Q5_0 | d * (q - 16) | 5 | d | -16 d |
| Q5_1 | d * q + m | 5 | d | m |
| Q4_K | sub-block of 32: (d sc_j) q - dmin m_j | 4 | d sc_j | -dmin m_j |
| Q5_K | likewise, 5-bit q | 5 | d sc_j | -dmin m_j |

Scales and biases are kept in float32: d and m are float16 in the file, and d * sc_j (a float16 times a 6-bit
integer) needs up to 17 significant bits, more than float16 has. In float32 every product s * q is exact, so
`mx.dequantize` gives bit for bit what `gguf.quants.dequantize` gives (tested), and on the CPU backend float32
is also the fast dtype (OpenBLAS). Cost: 2 bits per weight for scale and bias (Q4_1: 6 bits a weight here,
5 in the file).

Q6_K, Q3_K, Q2_K use sub-blocks of 16, which MLX cannot express (its smallest group is 32): they, and the
other types gguf-py can decode (IQ*, TQ*), are dequantized to float32. Not float16: their values (d * sc * q)
need more significant bits than float16 has, and the CPU backend computes float32 fastest anyway.
Re-quantizing them on MLX's own grid is never done: on small models that costs much quality.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .reader import GGUFError

GROUP_SIZE = 32

FLOAT_TYPES = ("F32", "F16", "BF16")
KEPT_TYPES = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}
"""GGUF type -> MLX bits, for the types stored as MLX affine-quantized weights, losslessly."""
DEQUANTIZED_TYPES = ("Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS",
                     "IQ2_XXS", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4")
"""Types dequantized to float32 (by gguf-py's `gguf.quants.dequantize`)."""
SUPPORTED_TYPES = FLOAT_TYPES + tuple(KEPT_TYPES) + DEQUANTIZED_TYPES


@dataclass
class Tensor:
    """One tensor ready for MLX, rows first (for a weight matrix: (out_features, in_features)).

    Float: `weight` is float32/float16, or uint16 holding bfloat16 bits (`bf16=True`), and `bits` is None.
    Quantized: `weight` (rows, in * bits / 32) uint32, `scales` and `biases` (rows, in / 32) float32.
    `source` is the GGUF type name it came from.
    """

    weight: np.ndarray
    source: str
    scales: Optional[np.ndarray] = None
    biases: Optional[np.ndarray] = None
    bits: Optional[int] = None
    bf16: bool = False

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def shape(self) -> tuple:
        """The logical shape (for quantized tensors, the unpacked one)."""
        if self.bits is None:
            return tuple(self.weight.shape)
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 32 // self.bits)

    def map_rows(self, fn) -> "Tensor":
        """Apply `fn` (an array -> array function acting on axis 0) to the weight, scales and biases alike."""
        return replace(self, weight=fn(self.weight),
                       scales=None if self.scales is None else fn(self.scales),
                       biases=None if self.biases is None else fn(self.biases))


def type_name(reader_tensor) -> str:
    return reader_tensor.tensor_type.name


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers `q` (rows, n), each < 2**bits, into MLX's layout: (rows, n * bits / 32) uint32.

    A row is one little-endian bit stream: value i occupies bits [i*bits, (i+1)*bits). `n * bits` must be a
    multiple of 32 (always so for groups of 32).
    """
    rows, n = q.shape
    q = q.astype(np.uint8, copy=False)
    if bits == 8:
        packed = np.ascontiguousarray(q)
    elif bits == 4:
        packed = (q[:, 0::2] | (q[:, 1::2] << np.uint8(4))).astype(np.uint8)
    else:  # general case: spread to bits, repack bytes (5 x the data in temporaries; fine per tensor)
        bit_planes = (q[:, :, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
        packed = np.packbits(bit_planes.reshape(rows, n * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").reshape(rows, n * bits // 32)


def _blocks(data: np.ndarray, rows: int, type_size: int) -> np.ndarray:
    """The raw bytes of a quantized tensor as (rows * blocks_per_row, type_size) uint8."""
    return np.asarray(data, dtype=np.uint8).reshape(rows, -1).reshape(-1, type_size)


def _f16(col: np.ndarray) -> np.ndarray:
    """Two bytes per block -> float32 (n_blocks, 1)."""
    return np.ascontiguousarray(col).view("<f2").astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout of a block of 32: byte j holds value j (low nibble) and j + 16 (high)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's fifth bits: a little-endian uint32 per block, bit j for value j -> (n_blocks, 32) 0/1."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _decode_q8_0(b):
    d = _f16(b[:, 0:2])
    q = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128.0 * d


def _decode_q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles_32(b[:, 2:18]), d, -8.0 * d


def _decode_q4_1(b):
    return _nibbles_32(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _decode_q5_0(b):
    d = _f16(b[:, 0:2])
    q = _nibbles_32(b[:, 6:22]) | (_high_bits_32(b[:, 2:6]) << np.uint8(4))
    return q, d, -16.0 * d


def _decode_q5_1(b):
    q = _nibbles_32(b[:, 8:24]) | (_high_bits_32(b[:, 4:8]) << np.uint8(4))
    return q, _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _k_scales(b):
    """Q4_K/Q5_K super-block header: d, dmin (float16) and 8 packed 6-bit (scale, min) pairs.

    Returns per sub-block of 32 (n, 8) float32 scale d*sc_j and bias -dmin*m_j."""
    import gguf

    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low 4 bits: 4 chunks of 32 bytes; chunk c holds sub-block 2c (low nibbles), 2c+1 (high)."""
    n = qs.shape[0]
    chunks = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (chunks & np.uint8(0x0F)).reshape(n, 256)


def _decode_q4_k(b):
    scale, bias = _k_scales(b)
    return _k_nibbles(b[:, 16:144]), scale, bias


def _decode_q5_k(b):
    scale, bias = _k_scales(b)
    qh = b[:, 16:48]  # bit j of byte i: the fifth bit of value i of sub-block j
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    return _k_nibbles(b[:, 48:176]) | (high.reshape(-1, 256) << np.uint8(4)), scale, bias


_DECODERS = {"Q8_0": (_decode_q8_0, 34, 32), "Q4_0": (_decode_q4_0, 18, 32), "Q4_1": (_decode_q4_1, 20, 32),
             "Q5_0": (_decode_q5_0, 22, 32), "Q5_1": (_decode_q5_1, 24, 32), "Q4_K": (_decode_q4_k, 144, 256),
             "Q5_K": (_decode_q5_k, 176, 256)}
"""type -> (decoder, bytes per block, values per block). A decoder maps (n_blocks, bytes) uint8 to
q (n_blocks, values) uint8 and per-group-of-32 scale, bias (n_blocks, values / 32) float32."""


def decode_affine(data: np.ndarray, qtype: str, rows: int, cols: int) -> Tensor:
    """A Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K tensor (`rows` x `cols` values) as an MLX affine Tensor."""
    decoder, type_size, block = _DECODERS[qtype]
    q, scale, bias = decoder(_blocks(data, rows, type_size))
    groups = cols // GROUP_SIZE
    return Tensor(weight=pack_bits(q.reshape(rows, cols), KEPT_TYPES[qtype]), source=qtype,
                  scales=np.ascontiguousarray(scale.reshape(rows, groups), dtype=np.float32),
                  biases=np.ascontiguousarray(bias.reshape(rows, groups), dtype=np.float32),
                  bits=KEPT_TYPES[qtype])


def dequantize(reader_tensor) -> np.ndarray:
    """Any supported tensor as float32, in its numpy (rows first) shape."""
    import gguf

    qtype = type_name(reader_tensor)
    if qtype == "BF16":
        bits = np.asarray(reader_tensor.data).view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(_logical_shape(reader_tensor))
    if qtype in ("F32", "F16"):
        return np.asarray(reader_tensor.data, dtype=np.float32)
    try:
        out = gguf.quants.dequantize(np.asarray(reader_tensor.data), reader_tensor.tensor_type)
    except NotImplementedError:
        raise _unsupported(reader_tensor) from None
    return out.reshape(_logical_shape(reader_tensor))


def _logical_shape(reader_tensor) -> tuple:
    return tuple(int(d) for d in reversed(list(reader_tensor.shape)))


def _unsupported(reader_tensor) -> GGUFError:
    return GGUFError(f"tensor '{reader_tensor.name}' has type {type_name(reader_tensor)}, which poet-mlx cannot "
                     f"load (supported: {', '.join(SUPPORTED_TYPES)}); use a GGUF of another quantization")


def read_tensor(reader_tensor, *, keep_quantized: bool = True) -> Tensor:
    """Read one GGUF tensor (a gguf ReaderTensor) into a `Tensor`.

    F32/F16 stay as they are, BF16 stays bfloat16 (as raw bits). The `KEPT_TYPES` become MLX affine
    quantized when `keep_quantized` (2-D weights whose rows are a whole number of groups), else and for
    the `DEQUANTIZED_TYPES` float32. Raises GGUFError naming the tensor for any other type.
    """
    qtype = type_name(reader_tensor)
    shape = _logical_shape(reader_tensor)
    if qtype not in SUPPORTED_TYPES:
        raise _unsupported(reader_tensor)
    if qtype == "F32":
        return Tensor(np.asarray(reader_tensor.data, dtype=np.float32).reshape(shape), qtype)
    if qtype == "F16":
        return Tensor(np.asarray(reader_tensor.data, dtype=np.float16).reshape(shape), qtype)
    if qtype == "BF16":
        return Tensor(np.asarray(reader_tensor.data).view("<u2").reshape(shape), qtype, bf16=True)
    if qtype in KEPT_TYPES and keep_quantized and len(shape) == 2 and shape[1] % GROUP_SIZE == 0:
        return decode_affine(reader_tensor.data, qtype, shape[0], shape[1])
    return Tensor(dequantize(reader_tensor), qtype)


def as_float32(t: Tensor) -> np.ndarray:
    """The values of a Tensor as float32 (dequantizing with MLX's own formula s * q + b)."""
    if t.bf16:
        return (t.weight.astype(np.uint32) << 16).view(np.float32)
    if not t.quantized:
        return t.weight.astype(np.float32)
    import mlx.core as mx

    out = mx.dequantize(mx.array(t.weight), mx.array(t.scales), mx.array(t.biases), group_size=GROUP_SIZE,
                        bits=t.bits, mode="affine")
    return np.array(out.astype(mx.float32))


def concat_rows(parts: list) -> Tensor:
    """Stack Tensors along rows (fusing q/k/v or gate/up). Same kind and bits: kept as is (exact, since each
    row is independent); otherwise all are dequantized to float32."""
    first = parts[0]
    same = all(p.bits == first.bits and p.bf16 == first.bf16 and p.weight.dtype == first.weight.dtype
               for p in parts)
    source = "+".join(sorted({p.source for p in parts}))
    if not same:
        return Tensor(np.concatenate([as_float32(p) for p in parts], axis=0), source)

    def cat(key: str):
        return None if getattr(first, key) is None else np.concatenate([getattr(p, key) for p in parts], axis=0)

    return replace(first, weight=cat("weight"), scales=cat("scales"), biases=cat("biases"), source=source)
