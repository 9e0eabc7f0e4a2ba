"""Log the first lines of a kind one by one, then only count them.

A run can meet the same kind of row (a duplicate key, a NULL key, a lead another row holds) millions
of times; the task log names the first few and counts the rest. Two shapes: :class:`LogCap` for rows
met one at a time while a run streams, :func:`log_first` for a list known at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

T = TypeVar("T")


class LogCap:
    """How many lines of one kind were met, and whether the next one is still logged.

    ``if cap.take(): log.warning(...)`` logs the first ``limit`` lines; :attr:`first_over` is true
    once, for the line right after them (where a "further lines are only counted" note goes).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.met = 0

    def take(self) -> bool:
        """Count a line; True while it is among the first ``limit`` (log it)."""
        self.met += 1
        return self.met <= self.limit

    @property
    def first_over(self) -> bool:
        """The line just counted is the first one past the limit."""
        return self.met == self.limit + 1

    @property
    def full(self) -> bool:
        """``limit`` lines (or more) were met: further ones are (or would be) only counted."""
        return self.met >= self.limit


def log_first(
    log: Callable[..., Any],
    items: Sequence[T],
    limit: int,
    line: str,
    args: Callable[[T], tuple[Any, ...]],
    more: str,
) -> None:
    """``log(line, *args(item))`` for the first ``limit`` items, then ``log(more, how_many_more)``."""
    for item in items[:limit]:
        log(line, *args(item))
    if len(items) > limit:
        log(more, len(items) - limit)
