"""The one redaction rule: what counts as a secret, and how it is masked before anything is persisted or printed.

A secret is
- the credentials of a URL: its `user:password@` part and the value of every query parameter whose name
  says secret (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, token, sig, api_key, ...);
- the value of a setting whose name says secret (`storage_options.secret`, `...token`, `...password`,
  `...key`, `api_key`, `credentials`, ...), at any depth of a mapping.
Masked values read `***`. Run metadata, markers, stats, submission records, rendered scripts, model ids and
printed messages pass through this module; the data itself (the URLs of a URL list in its shards) does not.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK = "***"

_SECRET_NAME = re.compile(
    r"(secret|token|passw(or)?d|passwd|pwd|credential|signature|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|^key$|_key$|^sig$|^auth$|authorization|session)",
    re.IGNORECASE,
)
_NOT_SECRET = re.compile(r"(_env$|_id$|^key_id$|_path$|_file$)", re.IGNORECASE)
"""Names that only point at a secret (api_key_env, key_id, ..._file): their values are not secrets."""

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>)\]]+")


def is_secret_name(name: str) -> bool:
    """True for a setting or query-parameter name that holds a secret (see the module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    return bool(_SECRET_NAME.search(leaf)) and not _NOT_SECRET.search(leaf)


def redact_url(url: str) -> str:
    """`url` with its password and secret query values masked (user names and other parameters kept)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(k) for k, _ in pairs):
            query = "&".join(f"{quote(k, safe='-_.~')}={MASK if is_secret_name(k) else quote(v, safe='-_.~/:')}"
                             for k, v in pairs)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_without_credentials(url: str) -> str:
    """`url` with no user info and no query at all: the name of a server, e.g. for a model id."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with every URL in it redacted."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact(value: Any, name: str = "") -> Any:
    """A copy of a JSON-like value with secret-named entries masked and every URL in its strings redacted."""
    if name and is_secret_name(name) and value not in (None, "", {}, []):
        return MASK
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def is_secret_override(item: str) -> bool:
    """True for a `--set key=value` whose key names a secret or whose value carries URL credentials."""
    key, _, value = item.partition("=")
    return is_secret_name(key.strip()) or redact_text(value) != value


def redact_override(item: str) -> str:
    """A `--set key=value` as it may be shown or recorded."""
    key, sep, value = item.partition("=")
    if not sep:
        return item
    return f"{key}={MASK}" if is_secret_name(key.strip()) else f"{key}={redact_text(value)}"
