"""A flow's telemetry is an append-only log: a save writes what was appended since the
run's previous save and neither reads nor copies the rest (the bytes this process reads
are counted by the kernel, /proc/self/io), and what it saves is the whole history."""

import os
import shutil
import sys
from collections import Counter

import numpy as np
import pytest

from computable_flows_shim import CheckpointManager
from computable_flows_shim._format import telemetry as T
from computable_flows_shim.flow._recorder import TelemetryRecorder

needs_proc_io = pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts reads with /proc/self/io")

SAMPLES = 300_000  # four full telemetry chunks of 65,536 samples and a partial one
PHASES = ("RED", "AMBER", "GREEN")


def _read_bytes() -> int:
    """Bytes this process has read through read(2) and friends, page cache included."""
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def _record(rec: TelemetryRecorder, start: int, n: int, shift: float = 0.0) -> None:
    for i in range(start, start + n):
        rec.record(
            i, E=1.0 / (i + 1) + shift, grad_norm=float(i % 7), alpha=0.1, phase=PHASES[i % 3],
            sparsity_wx=0.5, eta_dd=0.01, gamma=0.2,
        )  # fmt: skip


@pytest.fixture(scope="module")
def recorder():
    rec = TelemetryRecorder()
    _record(rec, 0, SAMPLES)
    return rec


def _saved_equals(mgr: CheckpointManager, cid: str, history: dict) -> None:
    tel = mgr.load_checkpoint(cid)["telemetry"]
    for name, col in history.items():
        if name != "events":
            assert np.array_equal(tel[name], col), name
    assert tel["events"] == history["events"]
    assert mgr.verify_checkpoint(cid).ok


def _history_bytes(history: dict) -> int:
    return sum(c.nbytes for n, c in history.items() if n != "events")


@needs_proc_io
def test_a_recorders_second_save_reads_none_of_the_history(tmp_path, recorder):
    mgr = CheckpointManager(tmp_path / "s")
    first = mgr.create_checkpoint("r", 1, {"x": np.ones(4)}, {}, telemetry_history=recorder.history())
    rec = TelemetryRecorder.from_history(mgr.load_checkpoint(first)["telemetry"], 1)  # another log
    mgr2 = CheckpointManager(tmp_path / "s")
    # a new log (a resumed run): its first save compares the base's chunks, reading them
    second = mgr2.create_checkpoint("r", 2, {"x": np.ones(4)}, {}, telemetry_history=rec.history())
    _record(rec, SAMPLES, 1000)
    history = rec.history()
    before = _read_bytes()
    third = mgr2.create_checkpoint("r", 3, {"x": np.ones(4)}, {}, telemetry_history=history)
    read = _read_bytes() - before
    stats = mgr2.last_save_stats
    assert read < 256 << 10, (read, _history_bytes(history))  # the zarr.json files at most
    assert stats.chunks_linked == 4 * 9 + 1, stats  # the 4 full chunks of every sample column, the state
    assert stats.chunks_written == 9, stats  # the last, partial, chunk of every column
    _saved_equals(mgr2, third, history)
    summary = mgr2.load_checkpoint(third)["telemetry_summary"]
    assert summary["phase_counts"] == dict(Counter(history["phase"].tolist()))
    assert summary["samples"] == SAMPLES + 1000
    # the summary, built from the base's and the new samples, equals one built from them all
    assert summary == T.summarize(*T.normalize(dict(history)), 3)
    assert summary["energy_min"] == float(history["E"].min()) < 1.0 / SAMPLES
    _saved_equals(mgr2, second, {**history, **{k: v[:SAMPLES] for k, v in history.items() if k != "events"}})


@needs_proc_io
def test_a_plain_dict_history_is_compared_so_read(tmp_path, recorder):
    """The measurement above can fail: the same columns as a dict are read to be compared."""
    mgr = CheckpointManager(tmp_path / "s")
    history = {k: np.array(v) for k, v in recorder.history().items() if k != "events"}
    mgr.create_checkpoint("r", 1, {"x": np.ones(4)}, {}, telemetry_history=history)
    before = _read_bytes()
    cid = mgr.create_checkpoint("r", 2, {"x": np.ones(4)}, {}, telemetry_history=history)
    read = _read_bytes() - before
    assert read > 0.5 * _history_bytes({k: v for k, v in history.items() if k != "phase"}), read
    assert mgr.last_save_stats.chunks_linked == 5 * 9 + 1  # all found the same
    history["events"] = []
    _saved_equals(mgr, cid, history)


def test_a_log_chunk_replaced_on_disk_is_not_linked_unread(tmp_path):
    """Only a chunk file this process wrote is linked unread: one replaced since (a new file,
    other bytes) is compared, found different and written again from memory."""
    rec = TelemetryRecorder()
    _record(rec, 0, 70_000)
    mgr = CheckpointManager(tmp_path / "s")
    first = mgr.create_checkpoint("r", 1, {"x": np.ones(4)}, {}, telemetry_history=rec.history())
    chunk = os.path.join(mgr.checkpoint_path(first), "telemetry", "E", "c.0")
    with open(chunk, "rb") as f:
        data = bytearray(f.read())
    data[100] ^= 0xFF
    os.unlink(chunk)
    with open(chunk, "wb") as f:
        f.write(data)
    _record(rec, 70_000, 10)
    history = rec.history()
    cid = mgr.create_checkpoint("r", 2, {"x": np.ones(4)}, {}, telemetry_history=history)
    assert mgr.last_save_stats.chunks_linked == 8 + 1  # every full chunk but the replaced one, the state
    _saved_equals(mgr, cid, history)


@needs_proc_io
def test_a_log_continued_after_its_base_was_deleted_is_compared(tmp_path, recorder):
    mgr = CheckpointManager(tmp_path / "s")
    rec = TelemetryRecorder()
    _record(rec, 0, 70_000)
    first = mgr.create_checkpoint("r", 1, {"x": np.ones(4)}, {}, telemetry_history=rec.history())
    second = mgr.create_checkpoint("r", 2, {"x": np.ones(4)}, {}, telemetry_history=rec.history())
    shutil.rmtree(mgr.checkpoint_path(second))  # behind the manager's back: the base is first
    _record(rec, 70_000, 10)
    history = rec.history()
    before = _read_bytes()
    cid = mgr.create_checkpoint("r", 3, {"x": np.ones(4)}, {}, telemetry_history=history)
    read = _read_bytes() - before
    assert read > 8 * 65536 * 8, read  # the first chunk of every numeric column, read from first
    assert mgr.last_save_stats.chunks_linked == 9 + 1  # and found the same (and the state)
    _saved_equals(mgr, cid, history)
    assert os.path.isdir(mgr.checkpoint_path(first))


def test_an_async_save_of_a_log_while_it_grows(tmp_path):
    """The save holds no copy of the columns: the recorder goes on appending (and grows its
    buffers) while the save is written, and what was saved is the history at the call."""
    rec = TelemetryRecorder(capacity=1024)
    _record(rec, 0, 100_000)
    mgr = CheckpointManager(tmp_path / "s")
    mgr.create_checkpoint("r", 1, {"x": np.ones(4)}, {}, telemetry_history=rec.history())
    _record(rec, 100_000, 5)
    history = rec.history()
    cid = mgr.create_checkpoint("r", 2, {"x": np.ones(4)}, {}, telemetry_history=history, blocking=False)
    _record(rec, 100_005, 200_000)  # grows past the buffers' capacity (131,072) while saving
    mgr.wait_until_finished()
    _saved_equals(mgr, cid, history)
    with pytest.raises(ValueError):
        history["E"][0] = 5.0  # the recorder's views are read-only
    mgr.close()


def test_what_is_not_the_log_continued_is_compared(tmp_path):
    """A column replaced in the history's dict, an older snapshot saved after a newer one, and
    another run's chunk files put in place of the base (a rollback into the run after its last
    checkpoint was deleted) are never linked unread: each save holds exactly its history."""
    rec = TelemetryRecorder()
    _record(rec, 0, 70_000)
    mgr = CheckpointManager(tmp_path / "s")
    mgr.create_checkpoint("r", 1, {"x": np.ones(4)}, {}, telemetry_history=rec.history())
    edited = rec.history()
    edited["E"] = np.asarray(edited["E"]) + 1.0  # the caller's own column now
    cid = mgr.create_checkpoint("r", 2, {"x": np.ones(4)}, {}, telemetry_history=edited)
    _saved_equals(mgr, cid, edited)
    assert mgr.load_checkpoint(cid)["telemetry_summary"] == T.summarize(*T.normalize(dict(edited)), 2)

    older = rec.history()
    _record(rec, 70_000, 10)
    mgr.create_checkpoint("r", 3, {"x": np.ones(4)}, {}, telemetry_history=rec.history())
    cid = mgr.create_checkpoint("r", 4, {"x": np.ones(4)}, {}, telemetry_history=older)
    _saved_equals(mgr, cid, older)

    other = TelemetryRecorder()  # run "o": the same iterations, other energies
    _record(other, 0, 70_000, shift=5.0)
    mgr.create_checkpoint("o", 5, {"x": np.ones(4)}, {}, telemetry_history=other.history())
    rec2 = TelemetryRecorder()
    _record(rec2, 0, 70_000)
    mgr.create_checkpoint("b", 5, {"x": np.ones(4)}, {}, telemetry_history=rec2.history())
    mgr.delete_checkpoint("b-i000000000005")
    mgr.rollback_to_checkpoint("o-i000000000005", "b", 5)  # "b"'s base is now "o"'s files
    _record(rec2, 70_000, 10)
    history = rec2.history()
    cid = mgr.create_checkpoint("b", 6, {"x": np.ones(4)}, {}, telemetry_history=history)
    _saved_equals(mgr, cid, history)


@pytest.mark.parametrize("split", [0, 1, 3, 5, 9, 10])
def test_a_summary_continued_from_a_mark_equals_one_of_the_whole(split):
    """Energy range and phase counts carried over from an earlier save's summary (non-finite
    energies, an earlier part with none finite, phases first seen late) equal a fresh count."""
    cols = {
        "iter": np.arange(10),
        "E": np.array([np.nan, 3.0, np.inf, -1.0, np.nan, 2.0, -np.inf, 0.5, 7.0, np.nan]),
        "phase": np.array(["A", "B", "A", "C", "A", "B", "B", "C", "A", "D"], dtype=object),
    }
    earlier = T.summarize({k: v[:split] for k, v in cols.items()}, [], split)
    mark = T.LogMark("c", object(), split, earlier)
    assert T.summarize(cols, [], 10, mark) == T.summarize(cols, [], 10)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
