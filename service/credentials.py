"""Credentials kept out of what the service prints, records and launches.

One predicate, `is_credential_key`, says which option names carry secrets; the spec refuses such keys in
`storage.options`, the TorchX component refuses them as overrides, and `redact_arguments` hides their values in the
command line that goes into stats.txt. Only the standard library: the TorchX component imports this module.
"""

from __future__ import annotations

import re
from typing import Any

# Names (normalised: snake_case, lower case) whose values are secrets. A key is credential-like when its normalised
# name equals one of these or ends with `_` + one of them (`aws_secret_access_key`, `sse_customer_key`,
# `client_secret`), or when its name with the underscores removed ends with one of the multi-word ones
# (`secretaccesskey`).
CREDENTIAL_NAMES = (
    "key", "secret", "token", "password", "passwd", "pwd", "passphrase", "pkey",
    "session_token", "security_token", "access_token", "refresh_token", "id_token", "sas_token",
    "access_key", "access_key_id", "secret_key", "secret_access_key", "private_key", "account_key", "api_key",
    "apikey", "client_secret", "credential", "credentials", "connection_string", "auth", "authorization", "cookie",
)
_COMPACT_NAMES = tuple(name.replace("_", "") for name in CREDENTIAL_NAMES if "_" in name)
REDACTED = "***"
# scheme://user:password@host — the user info, up to the last @ before the path
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
_OVERRIDE = re.compile(r"(?P<option>--[A-Za-z0-9][\w\-]*=)?(?P<key>[A-Za-z_][\w.\-]*)=(?P<value>.*)", re.DOTALL)
_INLINE_KEY = re.compile(r"""["']?([A-Za-z_][\w\-]*)["']?\s*:(?!//)""")


def normalised_key(name: Any) -> str:
    """`SecretAccessKey`, `secret-access-key`, `SECRET_ACCESS_KEY` -> `secret_access_key`."""
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", str(name))
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text)
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def is_credential_key(name: Any) -> bool:
    """Whether an option named `name` carries a credential (case, dashes and camelCase do not matter)."""
    key = normalised_key(name)
    if any(key == word or key.endswith("_" + word) for word in CREDENTIAL_NAMES):
        return True
    return key.replace("_", "").endswith(_COMPACT_NAMES)


def has_url_userinfo(text: str) -> bool:
    """Whether `text` holds a URL with user info (`https://user:password@host`)."""
    return _URL_USERINFO.search(text) is not None


def redact_urls(text: str) -> str:
    """`text` with the user info of every URL in it replaced by ***."""
    return _URL_USERINFO.sub(lambda match: f"{match['scheme']}{REDACTED}@", text)


def credential_key(argument: str) -> str | None:
    """The credential-like name a `[--option=]KEY=VALUE` argument sets, or None: a dotted part of KEY, or a key of
    an inline YAML mapping in VALUE (`storage.options={secret: ...}`)."""
    match = _OVERRIDE.fullmatch(argument)
    if not match:
        return None
    for part in match["key"].split("."):
        if is_credential_key(part):
            return part
    for name in _INLINE_KEY.findall(match["value"]) if match["value"].lstrip().startswith(("{", "[")) else ():
        if is_credential_key(name):
            return name
    return None


def redact_arguments(args: list[str]) -> list[str]:
    """A command line safe to record: the value of every `--set KEY=VALUE`, `--set=KEY=VALUE` or `KEY=VALUE` whose
    KEY is credential-like is ***, and so is the user info of every URL."""
    redacted = []
    for argument in args:
        match = _OVERRIDE.fullmatch(argument)
        if match and credential_key(argument):
            argument = f"{match['option'] or ''}{match['key']}={REDACTED}"
        redacted.append(redact_urls(argument))
    return redacted


def redact_value(value: Any) -> Any:
    """A copy of a parsed value (dicts, lists, strings) with credential-like keys' values and URL user info hidden."""
    if isinstance(value, dict):
        return {key: REDACTED if is_credential_key(key) else redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    if isinstance(value, str):
        return redact_urls(value)
    return value
