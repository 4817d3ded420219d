"""CPU twin of the CUDA segment reduction of csrc/cuda/segment_reduce.cu.

The same index logic in Python: the chunk size rule, the stable sort with
out-of-range rows keyed past the last segment, the level-0 chunks over sorted
rows, the head / tail slots of cut segments (a chunk wholly inside one
segment writes its sum to the head slot and zero to the tail slot), the slot
ranges of later levels (level_range), and the levels down to one chunk. The
additions happen in the kernel's order, in the accumulation dtype, so on a GPU
the kernel's output must equal this bit for bit; on CPU the tests check it
against a float64 reference and check the invariants the kernel relies on
(every slot read was written; a segment's slots are contiguous; a segment is
written once; nothing is cut at the last level).
"""
from __future__ import annotations

import numpy as np

# Constants of csrc/cuda/segment_reduce.cu.
MAX_CHUNK_ROWS = 256
MIN_CHUNK_ROWS = 16
TARGET_BLOCKS = 512
COMBINE_ROWS = 64
MAX_THREADS = 128


def geometry(n: int, d: int, elem_bytes: int) -> tuple[int, int]:
    """(rows per level-0 chunk, slots per combine chunk), as launch_segment_tree picks them."""
    vec = 16 // elem_bytes
    groups = -(-d // vec)
    threads = min(MAX_THREADS, -(-groups // 32) * 32)
    tiles = -(-groups // threads)
    r0 = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, -(-(n * tiles) // TARGET_BLOCKS)))
    return r0, COMBINE_ROWS


def level_range(a: int, b: int, level: int, r0: int, r1: int) -> tuple[int, int]:
    for j in range(level):
        r = r0 if j == 0 else r1
        ca, cb = a // r, (b - 1) // r
        a, b = 2 * ca + 1, 2 * cb + 1
    return a, b


def segment_reduce(x: np.ndarray, ids: np.ndarray, num_segments: int, mean: bool, *,
                   r0: int, r1: int = COMBINE_ROWS, acc: type = np.float64) -> tuple[np.ndarray, int]:
    """(the [S, D] result in ``acc``, the number of levels)."""
    # 2 slots a chunk: fewer than 4 slots a combine chunk would never shrink.
    assert r1 >= 4
    n, d = x.shape
    keys = np.where((ids >= 0) & (ids < num_segments), ids, num_segments).astype(np.int64)
    perm = np.argsort(keys, kind="stable")
    sorted_keys = keys[perm]
    offsets = np.searchsorted(sorted_keys, np.arange(num_segments + 1), side="left")
    out = np.zeros((num_segments, d), dtype=acc)
    written = np.zeros(num_segments, dtype=bool)
    vals = x[perm].astype(acc)
    row_keys = np.where(sorted_keys < num_segments, sorted_keys, -1)
    level = 0
    while True:
        rpc = r0 if level == 0 else r1
        rows = len(row_keys)
        chunks = max(1, -(-rows // rpc))
        last = chunks <= 1
        # Unwritten slots are NaN: reading one would show in the result.
        part = np.full((2 * chunks, d), np.nan, dtype=acc)
        slot_keys = np.full(2 * chunks, -1, dtype=np.int64)
        if level > 0:  # a segment's slots are contiguous and all its own
            for seg in np.unique(row_keys[row_keys >= 0]):
                a, b = level_range(int(offsets[seg]), int(offsets[seg + 1]), level, r0, r1)
                assert (row_keys[a:b] == seg).all() and (row_keys[:a] != seg).all() and (row_keys[b:] != seg).all()
        for c in range(chunks):
            begin, end = c * rpc, min(rows, (c + 1) * rpc)

            def flush(seg: int, total: np.ndarray) -> None:
                a0, b0 = int(offsets[seg]), int(offsets[seg + 1])
                a, b = level_range(a0, b0, level, r0, r1)
                cut_before, cut_after = a < begin, b > end
                if not cut_before and not cut_after:
                    assert not written[seg], f"segment {seg} written twice"
                    written[seg] = True
                    count = b0 - a0
                    scale = acc(1) / acc(count) if mean and count > 1 else acc(1)
                    out[seg] = total * scale
                    return
                assert not last, f"segment {seg} cut at the last level"
                if cut_before:
                    part[2 * c], slot_keys[2 * c] = total, seg
                if cut_after:
                    part[2 * c + 1] = 0 if cut_before else total
                    slot_keys[2 * c + 1] = seg

            cur, total = -1, np.zeros(d, dtype=acc)
            for r in range(begin, end):
                k = int(row_keys[r])
                if k < 0:
                    continue
                if k != cur:
                    if cur >= 0:
                        flush(cur, total)
                    cur, total = k, np.zeros(d, dtype=acc)
                total = total + vals[r]
            if cur >= 0:
                flush(cur, total)
        if last:
            break
        vals, row_keys = part, slot_keys
        level += 1
    present = np.zeros(num_segments, dtype=bool)
    present[sorted_keys[sorted_keys < num_segments]] = True
    assert (written == present).all(), "a present segment was not written"
    return out, level + 1
