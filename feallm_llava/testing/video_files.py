"""Damaged and unusual video files for tests, made from a good one without any encoder
beyond OpenCV's: a copy cut short, and an MP4 rewritten to a variable frame rate.

`variable_frame_rate(src, dst, durations)` rewrites the MP4's time-to-sample table
(`moov/trak/mdia/minf/stbl/stts`) so frame k lasts `durations[k % len(durations)]` times
its original duration, updates the durations of the movie, track and media headers, and
turns the edit list (`edts`, which would cut the longer timeline at the old duration)
into a `free` box. The samples themselves are untouched; the `moov` box of an OpenCV /
FFmpeg MP4 comes after the media data, so growing it moves no chunk offset.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path


def truncated_copy(src: str | os.PathLike, dst: str | os.PathLike, fraction: float) -> Path:
    """The first `fraction` of `src`'s bytes, as a file cut short by a crash or a download would be."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[:int(len(data) * fraction)])
    return Path(dst)


def _boxes(data: bytes | bytearray, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        yield pos, size, kind.decode("latin-1"), header
        pos += size


def _path(data: bytes | bytearray, names: list[str]) -> list[tuple[int, int, int]]:
    """(offset, size, header size) of each box along `names` from the top level."""
    chain, start, end = [], 0, len(data)
    for name in names:
        for pos, size, kind, header in _boxes(data, start, end):
            if kind == name:
                chain.append((pos, size, header))
                start, end = pos + header, pos + size
                break
        else:
            raise ValueError(f"no {'/'.join(names[:len(chain) + 1])} box")
    return chain


def variable_frame_rate(src: str | os.PathLike, dst: str | os.PathLike, durations: list[int]) -> Path:
    """A copy of the single-track MP4 `src` whose frames last `durations` (cycled) frame times each."""
    data = bytearray(Path(src).read_bytes())
    chain = _path(data, ["moov", "trak", "mdia", "minf", "stbl", "stts"])
    pos, size, header = chain[-1]
    count = struct.unpack(">I", data[pos + header + 4:pos + header + 8])[0]
    entries = [struct.unpack(">II", data[pos + header + 8 + 8 * k:pos + header + 16 + 8 * k]) for k in range(count)]
    deltas = [delta for n, delta in entries for _ in range(n)]
    deltas = [d * durations[k % len(durations)] for k, d in enumerate(deltas)]
    body = struct.pack(">II", 0, len(deltas)) + b"".join(struct.pack(">II", 1, d) for d in deltas)
    stts = struct.pack(">I4s", 8 + len(body), b"stts") + body
    data[pos:pos + size] = stts
    for parent, parent_size, _ in chain[:-1]:
        struct.pack_into(">I", data, parent, parent_size + len(stts) - size)

    def content(names):
        p, _, h = _path(data, names)[-1]
        return p + h

    total = sum(deltas)
    movie, media = content(["moov", "mvhd"]), content(["moov", "trak", "mdia", "mdhd"])
    if data[movie] or data[media]:
        raise ValueError(f"{src}: version-1 (64-bit) movie or media header; only version 0 is rewritten")
    movie_scale, media_scale = (struct.unpack(">I", data[p + 12:p + 16])[0] for p in (movie, media))
    struct.pack_into(">I", data, media + 16, total)
    struct.pack_into(">I", data, movie + 16, total * movie_scale // media_scale)
    struct.pack_into(">I", data, content(["moov", "trak", "tkhd"]) + 20, total * movie_scale // media_scale)
    try:
        edts = _path(data, ["moov", "trak", "edts"])[-1][0]
        data[edts + 4:edts + 8] = b"free"
    except ValueError:
        pass
    Path(dst).write_bytes(bytes(data))
    return Path(dst)
