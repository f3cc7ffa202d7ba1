"""Identifiers: one grammar for token subjects, device ids, client ids and tenants. Pure.

An identifier reaches places where some characters mean something: NATS subjects
(``rt.rpc.<tenant>.user.<sub>``, presence keys ``...<tenant>.<room>.<client_id>``), where ``.``
separates tokens and ``*`` and ``>`` are wildcards; MQTT topics (``rtnode/v1/<client_id>/out``),
where ``/`` separates levels, ``+`` and ``#`` are wildcards and a leading ``$`` is the broker's;
personal room names (``@user:<sub>``, which must be room names); the node's indexes and actor
names. Rather than encode an identifier differently for each, rtnode accepts only identifiers
that mean nothing special anywhere, and checks them here, once, at the edge (a token's claims, an
MQTT CONNECT, an API request):

* an **id** (a token's ``sub``, a device id, a client id) is 1 to :data:`ID_MAX_LEN` (120)
  characters of ``A-Z a-z 0-9 _ : @ = -``: the characters of a room name, so that the personal
  room ``@device:<id>`` is a room name too (at most 128 characters);
* a **tenant** is 1 to :data:`TENANT_MAX_LEN` (64) characters of ``A-Z a-z 0-9 _ -``: no ``:``
  either, since room actors are named ``room:<tenant>:<room>`` and a tenant ``a:b`` would meet
  tenant ``a``'s room ``b:...``.

No dot, wildcard, slash, ``$``, ``+``, ``#``, whitespace, control character or non-ASCII letter
is ever part of one.
"""

from __future__ import annotations

import re
from typing import TypeGuard

__all__ = [
    "ID_MAX_LEN",
    "ID_PATTERN",
    "ID_RULE",
    "TENANT_MAX_LEN",
    "TENANT_PATTERN",
    "TENANT_RULE",
    "is_valid_id",
    "is_valid_tenant",
]

#: The longest id: ``@device:`` (8 characters) + an id is a room name (at most 128).
ID_MAX_LEN = 120
#: The longest tenant.
TENANT_MAX_LEN = 64

# For pydantic, whose (Rust) regex engine matches ``$`` only at the very end of the text.
ID_PATTERN = rf"^[A-Za-z0-9_:@=-]{{1,{ID_MAX_LEN}}}$"
TENANT_PATTERN = rf"^[A-Za-z0-9_-]{{1,{TENANT_MAX_LEN}}}$"
# For Python: ``\Z``, since Python's ``$`` also matches before a trailing newline.
_ID_RE = re.compile(rf"[A-Za-z0-9_:@=-]{{1,{ID_MAX_LEN}}}\Z")
_TENANT_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{TENANT_MAX_LEN}}}\Z")

#: The id grammar in words, for error messages.
ID_RULE = f"1-{ID_MAX_LEN} characters of A-Z a-z 0-9 _ : @ = -"
#: The tenant grammar in words, for error messages.
TENANT_RULE = f"1-{TENANT_MAX_LEN} characters of A-Z a-z 0-9 _ -"


def is_valid_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is an id (a ``sub``, a device or client id): a str of :data:`ID_RULE`."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


def is_valid_tenant(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a tenant: a str of :data:`TENANT_RULE`."""
    return isinstance(value, str) and _TENANT_RE.match(value) is not None
