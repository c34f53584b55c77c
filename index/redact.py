"""Redaction: credentials never reach a log line, a report or a resolved config written to disk.

Ray-free, used by the job report (:mod:`index.report`) and re-exported by :mod:`cluster.config`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

from reco.config import to_dict

REDACTED = "<redacted>"
#: words that make a key sensitive wherever they appear in it (``aws_secret_access_key``,
#: ``RAY_AUTH_TOKEN``, ``sessionToken``, ``db_password``, ``credentials``, ``Authorization``)
_SENSITIVE_WORDS = {
    "secret",
    "secrets",
    "password",
    "passwd",
    "pwd",
    "passphrase",
    "token",
    "tokens",
    "credential",
    "credentials",
    "authorization",
    "cookie",
    "cookies",
    "signature",
}
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]+)@")


def _key_words(key: str) -> list:
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)  # camelCase -> camel_Case
    return [w for w in re.split(r"[^a-z0-9]+", snake.lower()) if w]


def is_sensitive_key(key: Any) -> bool:
    """True for keys that name credentials: ``key``, ``secret``, ``token``, ``password`` (the
    fsspec/s3fs ``storage_options`` names), ``*_key`` (``api_key``, ``aws_secret_access_key``,
    ``private_key``), ``auth``, and any key containing a secret/token/password/credential word
    (``auth_mode`` is not one: it names a mode, not a credential)."""
    if not isinstance(key, str):
        return False
    words = _key_words(key)
    if not words:
        return False
    if _SENSITIVE_WORDS & set(words) or words == ["auth"]:
        return True
    # "key", "api_key", "private_key", "sse_customer_key" -- but not "key_column" or "keys"
    return words[-1] == "key" or words[-1] == "apikey"


def redact_text(text: str) -> str:
    """Mask the password of ``scheme://user:password@host`` URLs inside ``text``."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (mappings, lists, tuples, scalars) fit to log or write beside outputs.

    Values under sensitive keys (:func:`is_sensitive_key`) become ``"<redacted>"`` (None and empty
    values stay as they are, so a report still shows that no credential was given); passwords in
    ``scheme://user:password@host`` URLs are masked; strings holding a JSON object (e.g. the
    ``--storage-options`` argument in ``vars(args)``) are parsed, redacted and dumped again.
    Dataclasses are converted with ``reco.config.to_dict`` first; tuples and sets become lists (the
    result is meant for JSON / YAML).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return redact(to_dict(obj))
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if is_sensitive_key(k) and v not in (None, "", {}, []):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        s = obj.strip()
        if s.startswith("{") and s.endswith("}"):
            try:
                parsed = json.loads(s)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                return json.dumps(redact(parsed))
        return redact_text(obj)
    return obj
