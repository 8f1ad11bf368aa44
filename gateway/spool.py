"""A local append-only file that holds usage batches while Redis cannot take them.

Each record is one batch bound for one shard stream, framed as
`length:u32 | crc32:u32 | body`. The checksum is what lets a reader tell a torn last write
(the process died mid-`write`) from data: on open the file is scanned and cut back to the
last whole record, so later appends are never hidden behind garbage.

The body keeps the batch's producer id and sequence number, so a batch replayed after a
partial success is recognised by Redis and not appended twice (see usage_append.lua).

Every `append` ends with `fsync`: spooling only happens while Redis is failing, at most once
per flush interval, so the cost is small and what was spooled survives a crash or power loss.

When a record would push the file past `max_bytes` it is refused (newest data is dropped,
the file is never rewritten), and the caller counts the loss.

One gateway process owns one spool file at a time, enforced with `flock`: `Spool.open` takes
the first free `usage-N.spool` in the directory, so a restarted process adopts (and replays)
the file its dead predecessor left behind.
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_FRAME = struct.Struct(">II")
_BATCH = struct.Struct(">16sQHI")
_LEN = struct.Struct(">I")
_MAX_SLOTS = 1024


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    producer: bytes
    seq: int
    shard: int
    payloads: Sequence[bytes]


def encode_record(batch: SpooledBatch) -> bytes:
    parts = [_BATCH.pack(batch.producer, batch.seq, batch.shard, len(batch.payloads))]
    for payload in batch.payloads:
        parts.append(_LEN.pack(len(payload)))
        parts.append(payload)
    body = b"".join(parts)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _decode_body(body: bytes) -> SpooledBatch:
    producer, seq, shard, count = _BATCH.unpack_from(body)
    pos = _BATCH.size
    payloads = []
    for _ in range(count):
        (size,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        payloads.append(body[pos : pos + size])
        pos += size
    return SpooledBatch(producer, seq, shard, payloads)


class Spool:
    def __init__(self, path: Path, max_bytes: int) -> None:
        """Open and lock `path`; raises BlockingIOError when another process holds it."""
        self.path = path
        self.max_bytes = max_bytes
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise
        self.torn_bytes = 0
        self.size = self._recover()

    @classmethod
    def open(cls, directory: Path, max_bytes: int) -> Spool:
        directory.mkdir(parents=True, exist_ok=True)
        for slot in range(_MAX_SLOTS):
            try:
                return cls(directory / f"usage-{slot}.spool", max_bytes)
            except BlockingIOError:
                continue
        raise RuntimeError(f"no free spool slot in {directory}")

    def _recover(self) -> int:
        """Cut the file back to its last whole, checksummed record."""
        end = os.fstat(self._fd).st_size
        good = 0
        with open(self._fd, "rb", closefd=False) as fh:
            while True:
                header = fh.read(_FRAME.size)
                if len(header) < _FRAME.size:
                    break
                length, crc = _FRAME.unpack(header)
                body = fh.read(length)
                if len(body) < length or zlib.crc32(body) != crc:
                    break
                good += _FRAME.size + length
        if good < end:
            self.torn_bytes = end - good
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        return good

    def append(self, batches: Sequence[SpooledBatch]) -> int:
        """Write the batches that fit under max_bytes, fsync; returns the events refused."""
        chunks: list[bytes] = []
        refused = 0
        size = self.size
        for batch in batches:
            record = encode_record(batch)
            if size + len(record) > self.max_bytes:
                refused += len(batch.payloads)
                continue
            chunks.append(record)
            size += len(record)
        if chunks:
            os.pwrite(self._fd, b"".join(chunks), self.size)
            os.fsync(self._fd)
            self.size = size
        return refused

    def read(self, offset: int, max_bytes: int) -> tuple[list[SpooledBatch], int]:
        """Whole records from `offset` up to about `max_bytes`, and the offset after them."""
        batches: list[SpooledBatch] = []
        pos = offset
        while pos < self.size and pos - offset < max_bytes:
            length, _crc = _FRAME.unpack(os.pread(self._fd, _FRAME.size, pos))
            body = os.pread(self._fd, length, pos + _FRAME.size)
            batches.append(_decode_body(body))
            pos += _FRAME.size + length
        return batches, pos

    def clear(self) -> None:
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.size = 0

    def close(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
