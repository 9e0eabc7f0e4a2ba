"""RegistrationProgress: counts, summary, the failure-ratio check, and the progress lines."""

from __future__ import annotations

import logging
import threading

import pytest

from airflow_provider_lsq.outcomes import RegistrationOutcome, RegistrationStatus
from airflow_provider_lsq.progress import MAX_FAILURES_KEPT, RegistrationProgress
from airflow_provider_lsq.version_compat import AirflowException

LOGGER = "test.lsq.progress"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ok(key: str, attempts: int = 1) -> RegistrationOutcome:
    return RegistrationOutcome(key, RegistrationStatus.REGISTERED, lead_id=f"lead-{key}", attempts=attempts)


def bad(key: str, status: RegistrationStatus = RegistrationStatus.INVALID) -> RegistrationOutcome:
    return RegistrationOutcome(
        key, status, error_type="ValidationError", error_message="field 'EmailAddress': missing"
    )


def test_summary_counts_every_status() -> None:
    progress = RegistrationProgress(6)
    progress.add(ok("a"))
    progress.add(ok("b"))
    progress.add(RegistrationOutcome("c", RegistrationStatus.ALREADY_REGISTERED, attempts=1))
    progress.add(bad("d"))
    progress.add(bad("e", RegistrationStatus.FAILED))
    progress.add(bad("f", RegistrationStatus.UNCONFIRMED))
    summary = progress.summary(dry_run=False, duration=1.23456)
    assert summary == {
        "total": 6,
        "registered": 2,
        "already_registered": 1,
        "invalid": 1,
        "failed": 1,
        "unconfirmed": 1,
        "duplicates": 0,
        "dry_run": False,
        "duration_s": 1.235,
    }


def test_summary_for_transfer_and_dry_run() -> None:
    progress = RegistrationProgress(None, track_skips=True)
    progress.add_valid(3)
    progress.add_skipped(2)
    progress.add_duplicate()
    progress.add(bad("x"))
    summary = progress.summary(dry_run=True, duration=0.5)
    assert summary["valid"] == 3
    assert summary["skipped"] == 2
    assert summary["duplicates"] == 1
    assert summary["invalid"] == 1
    assert summary["total"] == 7  # every row read: counts add up
    assert summary["dry_run"] is True
    assert "valid" not in RegistrationProgress().summary(dry_run=False)
    assert "skipped" not in RegistrationProgress().summary(dry_run=False)


def test_failure_ratio_ignores_skips_and_names_row_keys() -> None:
    progress = RegistrationProgress(track_skips=True)
    for i in range(3):
        progress.add(ok(f"ok{i}"))
    progress.add(bad("row-9"))
    progress.add_skipped(100)  # not considered: 1 failure of 4 rows sent
    progress.raise_if_too_many_failures(0.25)
    with pytest.raises(AirflowException) as info:
        progress.raise_if_too_many_failures(0.2)
    message = str(info.value)
    assert "1 of 4 rows failed" in message
    assert "row row-9: ValidationError: field 'EmailAddress': missing" in message


def test_no_rows_never_fails() -> None:
    RegistrationProgress().raise_if_too_many_failures(0.0)


def test_keeps_only_the_first_failures() -> None:
    progress = RegistrationProgress()
    for i in range(500):
        progress.add(bad(f"k{i}", RegistrationStatus.FAILED))
    assert progress.failures == 500
    kept = progress.first_failures
    assert len(kept) == MAX_FAILURES_KEPT
    assert kept[0].startswith("row k0: ")
    with pytest.raises(AirflowException) as info:
        progress.raise_if_too_many_failures(0.5)
    message = str(info.value)
    assert "row k9:" in message
    assert "row k10:" not in message
    assert "490 more" in message


def test_first_failures_are_logged_then_only_counted(caplog: pytest.LogCaptureFixture) -> None:
    progress = RegistrationProgress(logger=logging.getLogger(LOGGER))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for i in range(30):
            progress.add(bad(f"k{i}"))
    lines = [r.getMessage() for r in caplog.records if "row k" in r.getMessage()]
    assert len(lines) == MAX_FAILURES_KEPT
    assert any("further failures are counted" in r.getMessage() for r in caplog.records)


def test_line_with_known_total_has_eta_and_rates() -> None:
    clock = FakeClock()
    progress = RegistrationProgress(100, clock=clock).start()
    try:
        for i in range(25):
            progress.add(ok(str(i), attempts=2))
        progress.add(bad("x"))
        clock.now += 13.0
        line = progress.line()
    finally:
        progress._stop.set()
    assert "26/100 rows (26%)" in line
    assert "2.0 rows/s" in line
    assert "3.8 calls/s" in line  # 50 attempts in 13 s
    assert "ETA 37s" in line  # 74 rows left at 2 rows/s
    assert "1 invalid or failed so far" in line


def test_line_without_total_has_no_eta() -> None:
    clock = FakeClock()
    progress = RegistrationProgress(None, clock=clock, track_skips=True)
    progress.add(ok("a"))
    progress.add_skipped(4)
    clock.now += 1.0
    line = progress.line()
    assert "5 rows" in line
    assert "ETA" not in line
    assert "4 skipped, 0 duplicates" in line


def test_logs_at_a_steady_pace_and_a_final_line(caplog: pytest.LogCaptureFixture) -> None:
    ticks: list[str] = []
    two_ticks = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "/10 rows" in record.getMessage() and "done in" not in record.getMessage():
                ticks.append(record.getMessage())
                if len(ticks) >= 2:
                    two_ticks.set()

    logger = logging.getLogger(LOGGER)
    watch = Watch()
    logger.addHandler(watch)
    try:
        with (
            caplog.at_level(logging.INFO, logger=LOGGER),
            RegistrationProgress(10, interval=0.01, logger=logger) as progress,
        ):
            progress.add(ok("a"))
            assert two_ticks.wait(10), "the ticker never logged twice"
    finally:
        logger.removeHandler(watch)
    assert all(line.startswith("LeadSquared registration: ") for line in ticks)
    last = caplog.records[-1].getMessage()
    assert "done in" in last
    assert "1/10 rows" in last


def test_lines_carry_only_keys(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(LOGGER)
    with (
        caplog.at_level(logging.INFO, logger=LOGGER),
        RegistrationProgress(2, interval=0, logger=logger) as p,
    ):
        p.add(ok("A-1"))
        p.add(
            RegistrationOutcome(
                "A-2", RegistrationStatus.FAILED, error_type="MXInvalidInputException", error_message="bad"
            )
        )
    text = caplog.text
    assert "row A-2: MXInvalidInputException: bad" in text
    assert "lead-A-1" not in text  # lead ids are not progress material
