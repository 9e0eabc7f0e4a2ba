"""Portal passwords for applicants who will set their own later."""

from __future__ import annotations

import secrets
import string

_SYMBOLS = "@#$%&*!?-_"
_CLASSES = (string.ascii_uppercase, string.ascii_lowercase, string.digits, _SYMBOLS)


def generate_password(length: int = 16) -> str:
    """A fresh, cryptographically random password with upper, lower, digit and symbol characters.

    It is sent once and kept nowhere: applicants set their own through the portal's forgot-password
    (or auto-login) flow.
    """
    if length < 12:
        raise ValueError("portal passwords are at least 12 characters long")
    rng = secrets.SystemRandom()
    chars = [rng.choice(cls) for cls in _CLASSES]
    alphabet = "".join(_CLASSES)
    chars += [rng.choice(alphabet) for _ in range(length - len(chars))]
    rng.shuffle(chars)
    return "".join(chars)
