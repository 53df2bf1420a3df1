"""Who owns a conversation when nobody is logged in.

An anonymous browser is known by its session key, the value of its
``sessionid`` cookie: whoever holds that value is that browser. The database,
the admin and the exports never hold it; they hold this token, a keyed hash of
it. The token names the same browser as long as ``SECRET_KEY`` is unchanged,
and cannot be turned back into a cookie.
"""

from __future__ import annotations

from django.utils.crypto import salted_hmac

# Namespaces the hash, so that the token is of no use elsewhere.
OWNER_TOKEN_SALT = "chatsite.conversation-owner"


def session_owner_token(session_key: str) -> str:
    """The token stored for the anonymous session ``session_key``: 64 hex digits.

    HMAC-SHA256 keyed with ``SECRET_KEY``; the same key always gives the same
    token, so conversations are looked up by it.
    """
    return salted_hmac(OWNER_TOKEN_SALT, session_key, algorithm="sha256").hexdigest()
