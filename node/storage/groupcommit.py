"""Group commit: writes made at once by several threads share one transaction and one commit.

Each received instance is acknowledged only after its row is committed, and each commit
waits for the disk (SQLite's WAL fsync with ``synchronous=FULL``; PostgreSQL's WAL flush).
With several associations at once, one commit per instance also has them queue for SQLite's
single write lock, where a waiting writer backs off by sleeping. Here the first caller
becomes the leader: it writes its own item and every item that arrived while the previous
commit ran, in one transaction, commits once, and hands every caller its own result; then
it passes the lead to a waiting caller, so no caller keeps leading (and keeps its own peer
waiting) under sustained load. A caller alone pays nothing extra: its batch is itself.

If a batch fails, each of its items is tried again in a transaction of its own, so one bad
item fails only its own caller.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiter(Generic[T, R]):
    item: T
    done: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    result: R | None = None
    error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """``submit(item)`` returns ``apply([item, ...])``'s result for that item."""

    def __init__(self, apply: Callable[[Sequence[T]], list[R]], max_batch: int = 64) -> None:
        self._apply = apply
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Waiter[T, R]] = []
        self._leading = False

    def submit(self, item: T) -> R:
        me: _Waiter[T, R] = _Waiter(item)
        with self._lock:
            self._pending.append(me)
            lead = not self._leading
            self._leading = True
        while not lead:
            me.done.wait()
            if me.finished:
                break
            me.done.clear()          # woken to lead: its item is still pending
            lead = True
        if lead:
            self._lead()
        if me.error is not None:
            raise me.error
        return me.result  # type: ignore[return-value]

    def _lead(self) -> None:
        with self._lock:
            batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
        self._run(batch)
        with self._lock:
            if self._pending:
                successor = self._pending[0]
                successor.done.set()     # it leads the next batch; the lead stays taken
            else:
                self._leading = False
        for waiter in batch:
            waiter.finished = True
            waiter.done.set()

    def _run(self, batch: list[_Waiter[T, R]]) -> None:
        try:
            results = self._apply([w.item for w in batch])
        except Exception as exc:  # noqa: BLE001 - handed to the callers
            if len(batch) == 1:
                batch[0].error = exc
                return
            for waiter in batch:     # find the bad one: each alone
                self._run([waiter])
            return
        for waiter, result in zip(batch, results):
            waiter.result = result
