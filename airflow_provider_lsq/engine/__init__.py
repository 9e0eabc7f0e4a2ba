"""The engine both bulk operators share: rows in, one recorded outcome per row out.

- :mod:`.duplicates`: one lead, one registration (the row keys and leads a run has met).
"""
