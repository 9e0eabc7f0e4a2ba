"""Open the store a connection names: a SQLite file (the default), memory, or Redis.

- nothing set: a SQLite file per account under :func:`~.stores.default_storage_dir`, shared by every
  task process on the machine;
- ``rate_limit_storage``: ``memory`` (this process only), or a file path (``sqlite:///`` URIs too);
- ``rate_limit_redis_conn_id``: an Airflow connection of the official ``redis`` type (its password is
  a real connection secret there), shared by every machine that reaches the server;
- ``rate_limit_storage`` holding a ``redis://`` URI: still read for one release, with a deprecation
  warning (Airflow shows an extra in clear, and 2.11's form drops it on save).

One store object per place and account serves every limiter of the process.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.hooks.config import is_redis_uri
from airflow_provider_lsq.hooks.rate_limit.stores import (
    MemoryLeaseStore,
    SqliteLeaseStore,
    default_storage_dir,
)

if TYPE_CHECKING:
    from airflow_provider_lsq.hooks.config import LeadSquaredConfig
    from airflow_provider_lsq.hooks.rate_limit.stores import LeaseStore

_stores: dict[tuple[str, str, str], LeaseStore] = {}
_stores_lock = threading.Lock()


def _file_path(storage: str | None, account: str) -> Path:
    if not storage:
        return default_storage_dir() / f"{account}.sqlite3"
    text = storage[len("sqlite:///") :] if storage.startswith("sqlite:///") else storage
    path = Path(text).expanduser()
    return path / f"{account}.sqlite3" if path.is_dir() else path


def _redis_from_connection(conn_id: str) -> tuple[Any, str]:
    """A Redis client from an Airflow ``redis`` connection, and a description without secrets."""
    try:
        from airflow.providers.redis.hooks.redis import RedisHook
    except ImportError as error:
        raise ValueError(
            f"rate_limit_redis_conn_id={conn_id!r} needs the official Redis provider: install the "
            "provider's redis extra (pip install 'airflow-provider-leadsquared[redis]', which installs "
            "apache-airflow-providers-redis)."
        ) from error
    from airflow_provider_lsq.masking import mask

    hook = RedisHook(redis_conn_id=conn_id)
    conn = hook.get_connection(conn_id)
    if conn.password:
        mask(conn.password)
    return hook.get_conn(), f"Redis (connection {conn_id!r})"


def _redis_from_uri(uri: str) -> tuple[Any, str]:
    import redis

    client = redis.Redis.from_url(uri)
    kwargs = client.connection_pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
    return client, f"Redis at {where} (the deprecated rate_limit_storage URI)"


def file_budget_path(config: LeadSquaredConfig) -> Path | None:
    """The file that holds ``config``'s budget, or None when it lives in memory or in Redis."""
    storage = config.rate_limit_storage
    if config.rate_limit_redis_conn_id or is_redis_uri(storage) or storage == "memory":
        return None
    return _file_path(storage, config.account_id)


def open_store(config: LeadSquaredConfig) -> LeaseStore:
    """The shared store for ``config``'s account (one object per place and account in a process)."""
    account = config.account_id
    storage = config.rate_limit_storage
    if config.rate_limit_redis_conn_id:
        key = ("redis-conn", config.rate_limit_redis_conn_id, account)
    elif is_redis_uri(storage):
        key = ("redis-uri", str(storage), account)
    elif storage == "memory":
        key = ("memory", "", account)
    else:
        key = ("file", str(_file_path(storage, account)), account)
    with _stores_lock:
        if key not in _stores:
            _stores[key] = _open(key, config)
        return _stores[key]


def _open(key: tuple[str, str, str], config: LeadSquaredConfig) -> LeaseStore:
    kind, where, account = key
    if kind == "memory":
        return MemoryLeaseStore()
    if kind == "file":
        return SqliteLeaseStore(Path(where), account)
    from airflow_provider_lsq.hooks.rate_limit.redis_store import RedisLeaseStore

    if kind == "redis-conn":
        client, description = _redis_from_connection(where)
    else:
        warnings.warn(
            "The leadsquared connection's rate_limit_storage extra holding a Redis URI is deprecated and "
            "will be removed in the next release: Airflow shows extras in clear and 2.11's form drops the "
            "field on save. Create an Airflow connection of type 'redis' and set its id in the "
            "rate_limit_redis_conn_id extra instead.",
            _deprecation_category(),
            stacklevel=4,
        )
        client, description = _redis_from_uri(where)
    return RedisLeaseStore(client, account, description)


def _deprecation_category() -> type[Warning]:
    try:
        from airflow.exceptions import AirflowProviderDeprecationWarning
    except ImportError:  # pragma: no cover - every supported Airflow has it
        return DeprecationWarning
    return AirflowProviderDeprecationWarning
