"""pytest fixtures to test your own DAGs and tasks against a local LeadSquared sandbox.

Installed as a pytest plugin (entry point ``leadsquared``), so the fixtures are available everywhere:

- ``leadsquared_sandbox``: a started :class:`~airflow_provider_lsq.sandbox.Sandbox` (25 calls / 5 s),
  stopped after the test. Customise it with a marker,
  ``@pytest.mark.leadsquared_sandbox(rate_limit_calls=5, fault_rate=0.1, seed=1)``, or with indirect
  parametrization, ``@pytest.mark.parametrize("leadsquared_sandbox", [{"refusal_form": "200"}],
  indirect=True)``.
  ``background_rate=1.0`` makes the sandbox play the account's other integrations (web forms,
  telephony) at 1 call per second, random arrivals, on the same budget; ``sandbox.refusals_by_caller``
  then tells whose calls were refused (``ours``, ``background``).
- ``leadsquared_sandbox_factory``: a function ``(**kwargs) -> Sandbox``, for several sandboxes in one test.
- ``leadsquared_conn``: the sandbox above, also exported as ``AIRFLOW_CONN_LEADSQUARED_DEFAULT``.

This module never imports Airflow, so it loads in any pytest run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from airflow_provider_lsq.sandbox import Sandbox

SandboxFactory = Callable[..., Sandbox]
CONN_ENV = "AIRFLOW_CONN_LEADSQUARED_DEFAULT"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "leadsquared_sandbox(**kwargs): Sandbox(...) arguments for the leadsquared_sandbox fixture"
    )


@pytest.fixture
def leadsquared_sandbox_factory() -> Iterator[SandboxFactory]:
    """Return ``make(**kwargs)``: each call starts a ``Sandbox(**kwargs)``; all stop at teardown."""
    started: list[Sandbox] = []

    def make(**kwargs: Any) -> Sandbox:
        sandbox = Sandbox(**kwargs).start()
        started.append(sandbox)
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


@pytest.fixture
def leadsquared_sandbox(
    request: pytest.FixtureRequest, leadsquared_sandbox_factory: SandboxFactory
) -> Sandbox:
    """A started sandbox for this test; the marker's and ``request.param``'s kwargs customise it."""
    kwargs: dict[str, Any] = {}
    marker = request.node.get_closest_marker("leadsquared_sandbox")
    if marker is not None:
        kwargs.update(marker.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, dict):
        kwargs.update(param)
    return leadsquared_sandbox_factory(**kwargs)


@pytest.fixture
def leadsquared_conn(leadsquared_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """The sandbox, with ``AIRFLOW_CONN_LEADSQUARED_DEFAULT`` pointing at it for this test."""
    monkeypatch.setenv(CONN_ENV, leadsquared_sandbox.connection_json())
    return leadsquared_sandbox
