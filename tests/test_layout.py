"""The package's layout (CONTRIBUTING.md): every import path of earlier releases still works and names
the same object as its new home; the modules the provider info names exist; the ledger's store
names no database (its dialect does)."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

P = "airflow_provider_lsq"
RUN, LEDGER, TRANSFER = f"{P}.registration_run", f"{P}.transfers.ledger", f"{P}.transfers.sql_to_leadsquared"
# (old module, name, new module): each name importable from its old module, the same object.
MOVED = [
    *((RUN, name, f"{P}.engine.run") for name in ("RegistrationRun", "MAX_UNRECORDED_LOGGED")),
    *((RUN, name, f"{P}.engine.sinks") for name in ("OutcomeSink", "MemorySink")),
    *((RUN, name, f"{P}.engine.rows") for name in ("Row", "VALID", "row_key", "valid_outcome_dict")),
    *((RUN, name, f"{P}.engine.registration") for name in ("check_lead", "DRY_RUN_PASSWORD")),
    *((LEDGER, name, f"{LEDGER}.store") for name in ("RegistrationLedger", "LedgerUnavailableError")),
    *(
        (LEDGER, name, f"{LEDGER}.rows")
        for name in ("LedgerRow", "PENDING", "OK_STATUSES", "SETTLED_STATUSES", "DEFAULT_PENDING_TIMEOUT")
    ),
    *(
        (LEDGER, name, f"{LEDGER}.schema")
        for name in (
            "COLUMNS",
            "ADDED_COLUMNS",
            "IDENTIFIER_COLUMN",
            "POSITION_COLUMN",
            "validate_table_name",
        )
    ),
    *((LEDGER, name, f"{LEDGER}.dialects") for name in ("SQLITE_BUSY_TIMEOUT_MS", "PG_LOCK_TIMEOUT")),
    (TRANSFER, "get_db_hook", f"{P}.warehouse"),
    *(
        (TRANSFER, name, f"{P}.transfers.planner")
        for name in ("MAX_LOGGED_KEYS", "MAX_LOGGED_PENDING", "STANDARD_ATTRIBUTES")
    ),
    (TRANSFER, "LedgerSink", f"{LEDGER}.sink"),
    (f"{P}.lineage", "prepare_transfer_lineage", f"{P}.lineage"),
    (f"{P}.lineage", "prepare_portal_lineage", f"{P}.lineage"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{old}.{name}" for old, name, _ in MOVED])
def test_an_old_import_path_names_the_moved_object(old: str, name: str, new: str) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


def test_the_two_operators_share_the_base_class() -> None:
    from airflow_provider_lsq.operators.base import LeadSquaredBaseOperator, PortalRegistrationBaseOperator
    from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
    from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator

    for operator in (RegisterPortalUserOperator, SqlToLeadSquaredPortalOperator):
        assert issubclass(operator, PortalRegistrationBaseOperator)
        assert issubclass(operator, LeadSquaredBaseOperator)


def test_the_provider_info_names_modules_and_classes_that_exist() -> None:
    from airflow_provider_lsq.get_provider_info import get_provider_info

    info = get_provider_info()
    for group in ("hooks", "operators"):
        for entry in info[group]:
            for module in entry["python-modules"]:
                importlib.import_module(module)
    for transfer in info["transfers"]:
        importlib.import_module(transfer["python-module"])
    for connection in info["connection-types"]:
        module, _, name = connection["hook-class-name"].rpartition(".")
        assert getattr(importlib.import_module(module), name)


def test_the_ledger_store_names_no_database() -> None:
    """Every difference between databases is the dialect's: no string in the store's code (its
    docstrings aside) names one."""
    from airflow_provider_lsq.transfers.ledger import store

    tree = ast.parse(inspect.getsource(store))
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    names = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }
    assert not names & {"sqlite", "postgresql", "generic", "mysql"}


def test_the_planner_reads_settings_not_the_operator() -> None:
    """The row planner gets a TransferSettings and hands the sink nothing behind the engine's back."""
    from airflow_provider_lsq.transfers import planner

    source = inspect.getsource(planner.RowPlanner)
    assert "self.op" not in source
    assert "self.sink" not in source
