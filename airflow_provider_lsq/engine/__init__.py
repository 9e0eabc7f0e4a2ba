"""The engine both bulk operators share: rows in, one recorded outcome per row out.

- :mod:`.run`: one task execution's run (its thread and stop, claims, batching and flushing, the
  dry run, the summary and the verdict);
- :mod:`.operation`: what is done to each row (validate it, send it with a hook call, map the
  result or the exception to its outcome); :mod:`.registration` registers portal users;
- :mod:`.concurrency`: rows sent concurrently within the account's rate limit;
- :mod:`.sinks`: where outcomes go (XCom's list here; the ledger's sink is the transfer's);
- :mod:`.rows`: a row's key, or an outcome decided before any call;
- :mod:`.duplicates`: one lead, one registration (the row keys and leads a run has met).

The hook makes one call per row and raises what went wrong; the engine owns the concurrency and
what each answer means for the row.
"""
