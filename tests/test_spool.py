from __future__ import annotations

import os
from pathlib import Path

from gateway.spool import Spool, SpooledBatch, encode_record

PRODUCER = bytes(range(16))


def _batch(seq: int, n: int = 3, shard: int = 1) -> SpooledBatch:
    return SpooledBatch(PRODUCER, seq, shard, [f"event-{seq}-{i}".encode() for i in range(n)])


def _read_all(spool: Spool) -> list[SpooledBatch]:
    batches, end = spool.read(0, 1 << 30)
    assert end == spool.size
    return batches


def test_batches_round_trip_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool", 1 << 20)
    assert spool.append([_batch(1), _batch(2, n=0), _batch(3, shard=7)]) == 0
    assert spool.append([_batch(4)]) == 0
    first, offset = spool.read(0, 1)
    assert [b.seq for b in first] == [1]
    rest, _ = spool.read(offset, 1 << 20)
    assert [b.seq for b in rest] == [2, 3, 4]
    assert rest[1].shard == 7 and rest[1].producer == PRODUCER
    assert list(rest[2].payloads) == [b"event-4-0", b"event-4-1", b"event-4-2"]
    spool.close()
    reopened = Spool(tmp_path / "s.spool", 1 << 20)
    assert [b.seq for b in _read_all(reopened)] == [1, 2, 3, 4]
    reopened.clear()
    assert reopened.size == 0 and _read_all(reopened) == []
    reopened.close()


def test_torn_last_write_is_cut_and_later_appends_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, 1 << 20)
    spool.append([_batch(1), _batch(2)])
    spool.close()
    whole = path.stat().st_size
    with path.open("ab") as fh:
        fh.write(encode_record(_batch(3))[:-5])  # the process died mid-write
    spool = Spool(path, 1 << 20)
    assert spool.torn_bytes > 0 and spool.size == whole
    spool.append([_batch(4)])
    spool.close()
    assert [b.seq for b in _read_all(Spool(path, 1 << 20))] == [1, 2, 4]


def test_corrupt_last_record_fails_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, 1 << 20)
    spool.append([_batch(1), _batch(2)])
    spool.close()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    spool = Spool(path, 1 << 20)
    assert [b.seq for b in _read_all(spool)] == [1]
    assert spool.torn_bytes == len(encode_record(_batch(2)))
    spool.close()


def test_full_spool_refuses_the_newest_batches(tmp_path: Path) -> None:
    record = len(encode_record(_batch(1)))
    spool = Spool(tmp_path / "s.spool", 2 * record + 10)
    assert spool.append([_batch(1), _batch(2), _batch(3, n=3)]) == 3
    assert spool.append([_batch(4, n=5)]) == 5
    assert [b.seq for b in _read_all(spool)] == [1, 2]
    assert os.path.getsize(spool.path) == spool.size == 2 * record
    spool.close()


def test_each_process_gets_its_own_slot_and_a_free_slot_is_adopted(tmp_path: Path) -> None:
    first = Spool.open(tmp_path, 1 << 20)
    second = Spool.open(tmp_path, 1 << 20)
    assert first.path != second.path
    first.append([_batch(1)])
    first.close()
    adopted = Spool.open(tmp_path, 1 << 20)
    assert adopted.path == first.path
    assert [b.seq for b in _read_all(adopted)] == [1]
    adopted.close()
    second.close()
