"""Group commit: concurrent rows share commits, each caller gets its own result or error."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from node.storage.db import Database, InstanceRecord
from node.storage.groupcommit import GroupCommit


def _run_threads(n: int, target) -> None:
    threads = [threading.Thread(target=target, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_items_share_a_commit_and_get_their_own_results():
    batches: list[int] = []

    def apply(items):
        batches.append(len(items))
        time.sleep(0.01)                  # a commit's wait for the disk
        return [item * 10 for item in items]

    group = GroupCommit(apply)
    results: dict[int, int] = {}

    def caller(k: int) -> None:
        for i in range(20):
            results[k * 100 + i] = group.submit(k * 100 + i)

    _run_threads(8, caller)
    assert results == {key: key * 10 for key in results} and len(results) == 160
    assert sum(batches) == 160
    assert len(batches) < 160 and max(batches) > 1      # commits were shared


def test_a_failing_item_fails_only_its_caller():
    def apply(items):
        time.sleep(0.005)
        if any(item < 0 for item in items):
            raise ValueError("bad item")
        return list(items)

    group = GroupCommit(apply)
    outcomes: dict[int, object] = {}
    start = threading.Barrier(6)

    def caller(k: int) -> None:
        start.wait()
        item = -1 if k == 3 else k
        try:
            outcomes[k] = group.submit(item)
        except ValueError as exc:
            outcomes[k] = exc

    _run_threads(6, caller)
    assert isinstance(outcomes.pop(3), ValueError)
    assert outcomes == {k: k for k in (0, 1, 2, 4, 5)}


def test_rows_recorded_from_many_threads_are_all_committed(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'node.db'}", root=tmp_path, node="test")
    db.create()

    def caller(k: int) -> None:
        for i in range(25):
            db.record_instance(InstanceRecord(
                study_uid="1.2.3", series_uid=f"1.2.3.{k}", sop_instance_uid=f"1.2.3.{k}.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                path=str(tmp_path / "images" / f"{k}-{i}.dcm"), size=1))

    _run_threads(8, caller)
    db.close()
    reopened = Database(f"sqlite:///{tmp_path / 'node.db'}", root=tmp_path, node="test")
    assert len(reopened.series_paths(reopened.quiet_series(time.time() + 1)[0].id)) == 25
    assert len(reopened.quiet_series(time.time() + 1)) == 8
    reopened.close()


if __name__ == "__main__":
    pytest.main([__file__])
