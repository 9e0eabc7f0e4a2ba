"""Rows sent concurrently, within the account's rate limit: one outcome per row as each ends.

A small thread pool shares one hook (its session and its one rate-limit budget), so slow answers do
not cap throughput. Which call a row makes and what its answer means is the operation's
(:mod:`airflow_provider_lsq.engine.operation`); this module only runs them.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.outcomes import RegistrationOutcome

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

    from airflow_provider_lsq.engine.operation import RowOperation
    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook


def send_rows(
    hook: LeadSquaredHook,
    operation: RowOperation,
    rows: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    max_workers: int | None = None,
    on_idle: Callable[[], None] | None = None,
    idle_seconds: float = 1.0,
    may_send: Callable[[str], bool] | None = None,
) -> Iterator[RegistrationOutcome]:
    """Run ``operation`` on many ``(key, row)`` pairs concurrently; yield one outcome per row as each ends.

    Rows are read lazily (at most two calls per worker are in flight: a call takes one row, or up to
    the operation's ``batch_size`` for a bulk operation), and only while the consumer takes
    outcomes: a consumer that stops reading stops the sending.

    Setting the hook's ``stopping`` flag stops the run early: no row is taken from ``rows`` after it,
    no retry is started, and rows taken but not yet sent end as ``failed`` ``NotSent`` outcomes
    (retryable, no call). A row's failure never stops the others; only what the operation raises
    (a failed login, which no row can survive) stops the run. Either way the outcome of every call
    already made is yielded before the generator ends (or raises that error).

    :param on_idle: called every ``idle_seconds`` while no outcome arrives (e.g. to flush records).
    :param may_send: ``may_send(key)`` is asked, from a worker thread, just before each call of a
        row is made (every attempt, after its rate-limit wait): False withdraws the row, which ends
        ``NotSent`` when no attempt was made, else ``failed`` (retryable).
    """
    workers = max_workers or hook.default_max_workers
    operation.prepare(hook)  # fail fast on what no row can survive, before any row is taken
    stopping = hook.stopping
    size = max(1, operation.batch_size)

    def run_one(group: list[tuple[str, Mapping[str, Any]]]) -> list[RegistrationOutcome]:
        if stopping.is_set():
            return [RegistrationOutcome.not_sent(key) for key, _ in group]
        if size == 1:
            key, row = group[0]
            guard = (lambda: may_send(key)) if may_send is not None else None
            return [operation.run_row(hook, key, row, guard)]
        return operation.run_batch(hook, group, may_send)

    errors: list[BaseException] = []  # what stops the run (a bad login), raised once all is yielded
    keys: dict[Future[list[RegistrationOutcome]], list[str]] = {}

    def finished(done: set[Future[list[RegistrationOutcome]]]) -> Iterator[RegistrationOutcome]:
        for future in done:
            group_keys = keys.pop(future)
            if future.cancelled():
                for key in group_keys:
                    yield RegistrationOutcome.not_sent(key)
                continue
            error = future.exception()
            if error is None:
                yield from future.result()
            else:
                errors.append(error)

    def next_done(pending: set[Future[list[RegistrationOutcome]]]) -> set[Future[list[RegistrationOutcome]]]:
        while True:
            if stopping.is_set():
                for future in pending:
                    future.cancel()  # not started yet: never sent
            done, _ = wait(pending, timeout=idle_seconds, return_when=FIRST_COMPLETED)
            if done:
                return done
            if on_idle is not None:
                on_idle()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=operation.thread_prefix) as pool:
        pending: set[Future[list[RegistrationOutcome]]] = set()
        for group in _groups(rows, size, stopping):
            if len(pending) >= 2 * workers:
                done = next_done(pending)
                pending -= done
                yield from finished(done)
                if errors:
                    break
            future = pool.submit(run_one, group)
            keys[future] = [key for key, _ in group]
            pending.add(future)
            if stopping.is_set():
                break
        while pending:  # every call already made ends in an outcome, even when the run stops
            done = next_done(pending)
            pending -= done
            yield from finished(done)
    if errors:
        raise errors[0]


def _groups(
    rows: Iterable[tuple[str, Mapping[str, Any]]], size: int, stopping: Any
) -> Iterator[list[tuple[str, Mapping[str, Any]]]]:
    """``rows`` in lists of up to ``size`` (one call each); a stop ends the list being filled."""
    group: list[tuple[str, Mapping[str, Any]]] = []
    for item in rows:
        group.append(item)
        if len(group) >= size or stopping.is_set():
            yield group
            group = []
            if stopping.is_set():
                return
    if group:
        yield group
