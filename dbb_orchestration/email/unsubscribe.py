"""RFC 8058 one-click unsubscribe headers for digests and sequence emails (docs/unsubscribe.md).

Every such email carries

    List-Unsubscribe: <FRONTEND_URL/unsubscribe?token=TOKEN>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

where ``TOKEN`` is ``<user id>.<signature>`` and the signature is the unpadded base64url of
HMAC-SHA256(key = ``UNSUBSCRIBE_SECRET`` as UTF-8, message = the user id as UTF-8). The backend (which
serves that URL) recomputes the signature with the same secret and compares in constant time; a mail
client POSTs ``List-Unsubscribe=One-Click`` to the URL, a person who clicks it GETs it. Without a secret
no header is added (nothing unverifiable is ever sent).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote

from dbb_orchestration.email.rendering import join_url

UNSUBSCRIBE_PATH = "/unsubscribe"
ONE_CLICK = "List-Unsubscribe=One-Click"


def _signature(user_id: str, secret: str) -> str:
    digest = hmac.new(secret.encode("utf-8"), user_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def unsubscribe_token(user_id: str, secret: str) -> str:
    """``<user id>.<base64url HMAC-SHA256 of the user id>`` (the signature never contains a dot)."""
    if not user_id or not secret:
        raise ValueError("an unsubscribe token needs a user id and a secret")
    return f"{user_id}.{_signature(user_id, secret)}"


def verify_unsubscribe_token(token: str, secret: str) -> str | None:
    """The user id when ``token`` was signed with ``secret``, else ``None`` (reference for the backend)."""
    user_id, dot, signature = (token or "").rpartition(".")
    if not dot or not user_id or not secret:
        return None
    return user_id if hmac.compare_digest(signature, _signature(user_id, secret)) else None


def unsubscribe_url(frontend_url: str, user_id: str, secret: str) -> str:
    token = quote(unsubscribe_token(user_id, secret), safe="")
    return f"{join_url(frontend_url, UNSUBSCRIBE_PATH)}?token={token}"


def list_unsubscribe_headers(frontend_url: str, user_id: str | None, secret: str | None) -> dict[str, str]:
    """The two RFC 8058 headers for ``user_id``; empty when there is no secret or no user id."""
    if not secret or not user_id:
        return {}
    return {
        "List-Unsubscribe": f"<{unsubscribe_url(frontend_url, user_id, secret)}>",
        "List-Unsubscribe-Post": ONE_CLICK,
    }
