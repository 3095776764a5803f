"""Lossless byte coders for weight files, chosen per tensor by measurement.

Every coder turns a tensor's raw bytes into a blob and back, exactly:

- ``raw``: the bytes as they are;
- ``bitpack``: small unsigned symbols (uint8 below ``2**b``) packed ``b`` bits each;
- ``huffman``: a canonical Huffman code over byte values (lengths <= 15 bits, the
  length table stored as one nibble per symbol), which wins on short, skewed
  streams such as k-means cluster indices, where the dictionary coders' headers
  and match search gain nothing;
- ``zlib``, ``bz2``, ``lzma`` (raw LZMA2, no container header) from the standard library,
  which win where the bytes repeat (e.g. runs of equal gaps).

:func:`encode_best` tries them all and keeps the smallest, so the choice is a
measurement, stored with the blob; :func:`decode` inverts it given the byte count.
Sparse positions are written as relative gaps (:func:`positions_to_gaps`) in LEB128
varints, one byte per gap below 128, which the coders then squeeze further.
"""

from __future__ import annotations

import bz2
import heapq
import lzma
import zlib

import numpy as np

MAX_CODE_BITS = 15  # the decoder's lookup table has 2**15 entries
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
CODERS = ("raw", "bitpack", "huffman", "zlib", "bz2", "lzma")


class CodingError(ValueError):
    """A blob that its coder cannot decode to the expected number of bytes."""


# -- gaps ------------------------------------------------------------------------------------------


def positions_to_gaps(positions: np.ndarray) -> np.ndarray:
    """Sorted flat positions -> the number of skipped entries before each (first: its position)."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.diff(positions, prepend=-1) - 1


def gaps_to_positions(gaps: np.ndarray) -> np.ndarray:
    return np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Non-negative integers as LEB128 bytes (7 bits per byte, high bit = more bytes follow)."""
    values = np.asarray(values, dtype=np.uint64)
    if values.size == 0:
        return np.zeros(0, np.uint8)
    widths = np.ones(values.size, np.int64)
    rest = values >> np.uint64(7)
    while rest.any():
        widths += rest > 0
        rest >>= np.uint64(7)
    out = np.empty(int(widths.sum()), np.uint8)
    starts = np.cumsum(widths) - widths
    for k in range(int(widths.max())):
        sel = widths > k
        byte = (values[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (widths[sel] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + k] = (byte | more).astype(np.uint8)
    return out


def varint_decode(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data, dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, np.int64)
    last = (data & 0x80) == 0
    if not last[-1]:
        raise CodingError("varint stream ends inside a number")
    group = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    shift = (np.arange(data.size) - starts[group]) * 7
    if shift.max() > 56:
        raise CodingError("varint longer than 64 bits")
    out = np.zeros(int(last.sum()), np.uint64)
    np.add.at(out, group, (data & 0x7F).astype(np.uint64) << shift.astype(np.uint64))
    return out.astype(np.int64)


# -- Huffman ---------------------------------------------------------------------------------------


def _code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths per byte value; frequencies are flattened until none exceeds 15 bits."""
    counts = counts.astype(np.int64)
    while True:
        used = np.flatnonzero(counts)
        lengths = np.zeros(256, np.int64)
        if used.size == 1:
            lengths[used] = 1
            return lengths
        heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
        heapq.heapify(heap)
        tie = len(heap)
        while len(heap) > 1:
            c1, _, s1 = heapq.heappop(heap)
            c2, _, s2 = heapq.heappop(heap)
            lengths[s1 + s2] += 1
            heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
            tie += 1
        if lengths.max() <= MAX_CODE_BITS:
            return lengths
        counts = np.where(counts > 0, (counts + 1) // 2, 0)  # flatter distribution, shorter longest code


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    codes = np.zeros(256, np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s], prev = code, int(lengths[s])
        code += 1
    return codes


def huffman_encode(data: bytes) -> bytes:
    """Blob: symbol-table size (1 byte, 0 = 256), one nibble per length, then the packed code bits."""
    sym = np.frombuffer(data, np.uint8)
    if sym.size == 0:
        return b""
    lengths = _code_lengths(np.bincount(sym, minlength=256))
    codes = _canonical_codes(lengths)
    table_size = int(np.flatnonzero(lengths).max()) + 1
    nibbles = lengths[:table_size].astype(np.uint8)
    nibbles = np.concatenate([nibbles, np.zeros(table_size % 2, np.uint8)])
    table = (nibbles[0::2] << 4) | nibbles[1::2]
    # Every code written MSB first: one row of MAX_CODE_BITS bits per symbol, the unused tail masked out.
    shifts = np.arange(MAX_CODE_BITS - 1, -1, -1)
    rows = (codes[:, None] << (MAX_CODE_BITS - np.maximum(lengths, 1))[:, None] >> shifts) & 1
    valid = np.arange(MAX_CODE_BITS) < lengths[sym][:, None]
    bits = rows[sym][valid].astype(np.uint8)
    return bytes([table_size % 256]) + table.tobytes() + np.packbits(bits).tobytes()


def huffman_decode(blob: bytes, count: int) -> bytes:
    if count == 0:
        return b""
    if not blob:
        raise CodingError("empty Huffman blob")
    table_size = blob[0] or 256
    table_bytes = (table_size + 1) // 2
    if len(blob) < 1 + table_bytes:
        raise CodingError("Huffman table truncated")
    packed = np.frombuffer(blob, np.uint8, offset=1, count=table_bytes)
    lengths = np.zeros(256, np.int64)
    lengths[:table_size] = np.stack([packed >> 4, packed & 15], 1).reshape(-1)[:table_size]
    if not lengths.any() or (lengths.max() > 1 and np.sum(2.0 ** -lengths[lengths > 0]) > 1.0):
        raise CodingError("invalid Huffman code lengths")
    codes = _canonical_codes(lengths)
    # Lookup table: every MAX_CODE_BITS-bit window -> (symbol, length) of the code it starts with.
    lookup_sym = np.zeros(1 << MAX_CODE_BITS, np.int64)
    lookup_len = np.zeros(1 << MAX_CODE_BITS, np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (MAX_CODE_BITS - int(lengths[s]))
        hi = lo + (1 << (MAX_CODE_BITS - int(lengths[s])))
        lookup_sym[lo:hi], lookup_len[lo:hi] = s, lengths[s]
    bits = np.unpackbits(np.frombuffer(blob, np.uint8, offset=1 + table_bytes))
    bits = np.concatenate([bits, np.zeros(MAX_CODE_BITS, np.uint8)]).astype(np.int64)
    windows = np.zeros(bits.size - MAX_CODE_BITS, np.int64)
    for j in range(MAX_CODE_BITS):
        windows = (windows << 1) | bits[j : j + windows.size]
    return _walk(windows, lookup_sym, lookup_len, count, bits.size - MAX_CODE_BITS)


def _walk(windows, lookup_sym, lookup_len, count: int, total_bits: int) -> bytes:
    """Follow the codes one after another (sequential by nature; the window table keeps it cheap)."""
    win, lsym, llen = windows.tolist(), lookup_sym.tolist(), lookup_len.tolist()
    out = bytearray(count)
    pos = 0
    for i in range(count):
        if pos >= total_bits:
            raise CodingError("Huffman bits end early")
        w = win[pos]
        if llen[w] == 0:
            raise CodingError("invalid Huffman code")
        out[i] = lsym[w]
        pos += llen[w]
    if pos > total_bits:
        raise CodingError("Huffman bits end early")
    return bytes(out)


# -- the coders ------------------------------------------------------------------------------------


def _bitpack(data: bytes) -> bytes | None:
    sym = np.frombuffer(data, np.uint8)
    if sym.size == 0:
        return b""
    width = max(1, int(sym.max()).bit_length())
    bits = (sym[:, None] >> np.arange(width - 1, -1, -1)) & 1
    return bytes([width]) + np.packbits(bits.astype(np.uint8)).tobytes()


def _unbitpack(blob: bytes, count: int) -> bytes:
    if count == 0:
        return b""
    width = blob[0] if blob else 0
    if not 1 <= width <= 8 or len(blob) - 1 < (count * width + 7) // 8:
        raise CodingError("bit-packed data truncated")
    bits = np.unpackbits(np.frombuffer(blob, np.uint8, offset=1), count=count * width).reshape(count, width)
    return (
        (bits.astype(np.uint8) << np.arange(width - 1, -1, -1).astype(np.uint8))
        .sum(1)
        .astype(np.uint8)
        .tobytes()
    )


def encode(coder: str, data: bytes) -> bytes:
    """``data`` coded with ``coder`` (every coder takes any bytes; bitpack and huffman pay off on symbols)."""
    if coder == "raw":
        return data
    if coder == "bitpack":
        return _bitpack(data)
    if coder == "huffman":
        return huffman_encode(data)
    if coder == "zlib":
        return zlib.compress(data, 9)
    if coder == "bz2":
        return bz2.compress(data, 9)
    if coder == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    raise ValueError(f"unknown coder {coder!r} (one of {', '.join(CODERS)})")


def encode_best(data: bytes, coders: tuple[str, ...] = CODERS) -> tuple[str, bytes]:
    """The smallest coding of ``data`` among ``coders`` (ties: the earlier, simpler one)."""
    unknown = [c for c in coders if c not in CODERS]
    if unknown or not coders:
        raise ValueError(f"coders must be some of {', '.join(CODERS)}; got {list(coders)}")
    return min(((c, encode(c, data)) for c in coders), key=lambda item: len(item[1]))


def decode(coder: str, blob: bytes, count: int) -> bytes:
    """Invert :func:`encode`; ``count`` is the number of bytes it must give back (else :class:`CodingError`)."""
    try:
        if coder == "raw":
            out = blob
        elif coder == "bitpack":
            out = _unbitpack(blob, count)
        elif coder == "huffman":
            out = huffman_decode(blob, count)
        elif coder == "zlib":
            out = zlib.decompress(blob)
        elif coder == "bz2":
            out = bz2.decompress(blob)
        elif coder == "lzma":
            out = lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
        else:
            raise CodingError(f"unknown coder {coder!r}")
    except (zlib.error, OSError, lzma.LZMAError, EOFError) as err:
        raise CodingError(f"{coder} data corrupt ({err})") from None
    if len(out) != count:
        raise CodingError(f"{coder} data gives {len(out)} bytes, expected {count}")
    return out
