"""How the node and its command-line tools authenticate to NATS.

:class:`NatsAuth` holds at most one way of authenticating (user and password, a token, an NKey
seed file or a ``.creds`` file) and, optionally, TLS. It is built from the node's settings
(:meth:`NatsAuth.from_settings`, checked at start so that a missing or unreadable file is one
line, not a trace from inside nats-py) and handed to ``nats.connect`` as keyword arguments
(:meth:`NatsAuth.connect_options`).

The embedded nats-server requires a user and password generated once in the node's data
directory (:func:`load_or_create_credentials`, mode 0600, reused across restarts). Next to them
the node writes how to reach its NATS (:func:`write_connection_file`: the URL and the path of
the credentials, mode 0600), so that ``rtnode replay`` and ``rtnode consume`` find it from
``--data-dir`` alone (:func:`read_connection_file`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors

from node.protocol.errors import ConfigError
from node.protocol.settings import Settings

__all__ = [
    "CONNECTION_FILE",
    "CREDENTIALS_FILE",
    "EMBEDDED_USER",
    "NatsAuth",
    "NatsEndpoint",
    "cli_target",
    "connect_refusal",
    "load_or_create_credentials",
    "read_connection_file",
    "remove_connection_file",
    "write_connection_file",
    "write_private_file",
]

# Both live in the node's data directory, mode 0600.
CREDENTIALS_FILE = "nats-credentials.json"
CONNECTION_FILE = "nats-connection.json"
EMBEDDED_USER = "rtnode"


def _readable(path: Path, setting: str) -> Path:
    """``path`` if it is a readable, non-empty file, else a one-line ConfigError naming it."""
    try:
        with path.open("rb") as f:
            if not f.read(1):
                raise ConfigError(f"{setting}: {path} is empty")
    except IsADirectoryError:
        raise ConfigError(f"{setting}: {path} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    return path


def _tls_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ConfigError("nats_tls_cert and nats_tls_key go together: set both or neither")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        if ca is not None:
            ctx.load_verify_locations(cafile=str(_readable(ca, "nats_tls_ca")))
        if cert is not None and key is not None:
            ctx.load_cert_chain(str(_readable(cert, "nats_tls_cert")),
                                str(_readable(key, "nats_tls_key")))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load the NATS TLS files: {exc.reason or exc}") from None
    return ctx


@dataclass(frozen=True)
class NatsAuth:
    """One way of authenticating to NATS (or none), and TLS (or none).

    Args:
        user: User name (with ``password``).
        password: Password of ``user``.
        token: An authentication token.
        nkey_seed: A file holding an NKey seed (``SU...``).
        creds: A ``.creds`` file (user JWT and NKey seed).
        tls: The TLS context for the connection.
    """

    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    nkey_seed: Path | None = None
    creds: Path | None = None
    tls: ssl.SSLContext | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> NatsAuth:
        """The authentication the settings ask for, with its files checked.

        Raises:
            ConfigError: More than one method, a user without a password (or the reverse), a
                missing, empty or unreadable file, or TLS files that do not load.
        """
        s = settings
        methods = [name for name, on in (
            ("nats_user/nats_password", bool(s.nats_user or s.nats_password)),
            ("nats_token", bool(s.nats_token)),
            ("nats_nkey_seed", s.nats_nkey_seed is not None),
            ("nats_creds", s.nats_creds is not None),
        ) if on]
        if len(methods) > 1:
            raise ConfigError(f"NATS authentication: set one of {' or '.join(methods)}, "
                              "not several")
        if bool(s.nats_user) != bool(s.nats_password):
            raise ConfigError("nats_user and nats_password go together: set both or neither")
        if s.nats_nkey_seed is not None or s.nats_creds is not None:
            _require_nkeys()
        return cls(
            user=s.nats_user, password=s.nats_password, token=s.nats_token,
            nkey_seed=None if s.nats_nkey_seed is None else _readable(s.nats_nkey_seed,
                                                                       "nats_nkey_seed"),
            creds=None if s.nats_creds is None else _readable(s.nats_creds, "nats_creds"),
            tls=_tls_context(s.nats_tls_ca, s.nats_tls_cert, s.nats_tls_key),
        )

    @property
    def method(self) -> str:
        """How this authenticates, for logs and errors (never the secret itself)."""
        if self.user:
            return f"user {self.user}"
        if self.token:
            return "token"
        if self.nkey_seed is not None:
            return f"NKey seed {self.nkey_seed}"
        if self.creds is not None:
            return f"credentials {self.creds}"
        return "no credentials"

    @property
    def configured(self) -> bool:
        """Whether any credentials are set (TLS alone does not count)."""
        return bool(self.user or self.token or self.nkey_seed or self.creds)

    def with_tls_of(self, other: NatsAuth) -> NatsAuth:
        """These credentials with ``other``'s TLS context when this has none."""
        if self.tls is not None or other.tls is None:
            return self
        return NatsAuth(user=self.user, password=self.password, token=self.token,
                        nkey_seed=self.nkey_seed, creds=self.creds, tls=other.tls)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` / ``Client.connect``."""
        options: dict[str, Any] = {}
        if self.user:
            options.update(user=self.user, password=self.password)
        if self.token:
            options["token"] = self.token
        if self.nkey_seed is not None:
            options["nkeys_seed"] = str(self.nkey_seed)
        if self.creds is not None:
            options["user_credentials"] = str(self.creds)
        if self.tls is not None:
            options["tls"] = self.tls
        return options


def _require_nkeys() -> None:
    if importlib.util.find_spec("nkeys") is None:  # nats-py signs the server's nonce with it
        raise ConfigError("nats_nkey_seed and nats_creds need the nkeys package "
                          "(pip install nkeys)")


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, the file being 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(path)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{what} {path} is not valid JSON: delete it to start afresh") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object: delete it to start afresh")
    return data


def _credentials(path: Path) -> NatsAuth:
    data = _read_json(path, "NATS credentials")
    user, password = data.get("user"), data.get("password")
    if not (isinstance(user, str) and user and isinstance(password, str) and password):
        raise ConfigError(f"NATS credentials {path} lack a user or password: delete the file "
                          "to have new ones generated")
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # someone loosened it: the password is for this user only
    return NatsAuth(user=user, password=password)


def load_or_create_credentials(data_dir: Path) -> tuple[NatsAuth, Path]:
    """The embedded nats-server's user and password, from ``data_dir/nats-credentials.json``
    (mode 0600), generated on first use and reused afterwards.

    Returns:
        The credentials and the file's path.

    Raises:
        ConfigError: The file exists but cannot be read or holds no user and password.
    """
    path = data_dir / CREDENTIALS_FILE
    if not path.exists():
        fresh = {"user": EMBEDDED_USER, "password": secrets.token_urlsafe(32)}
        write_private_file(path, json.dumps(fresh) + "\n")
    return _credentials(path), path


@dataclass(frozen=True)
class NatsEndpoint:
    """Where a node's NATS is and how to authenticate to it (from its connection file)."""

    url: str
    auth: NatsAuth


def write_connection_file(data_dir: Path, url: str, credentials: Path) -> Path:
    """Record, in ``data_dir``, how to reach the node's embedded NATS (mode 0600)."""
    path = data_dir / CONNECTION_FILE
    body = {"url": url, "credentials": str(credentials.resolve())}
    write_private_file(path, json.dumps(body) + "\n")
    return path


def remove_connection_file(data_dir: Path) -> None:
    """Forget the connection file (the embedded NATS stopped)."""
    with contextlib.suppress(FileNotFoundError):
        (data_dir / CONNECTION_FILE).unlink()


def read_connection_file(data_dir: Path) -> NatsEndpoint | None:
    """How to reach the NATS of the node using ``data_dir``; None when no node runs there.

    Raises:
        ConfigError: The file, or the credentials it names, cannot be read.
    """
    path = data_dir / CONNECTION_FILE
    if not path.exists():
        return None
    data = _read_json(path, "NATS connection file")
    url, creds = data.get("url"), data.get("credentials")
    if not (isinstance(url, str) and url and isinstance(creds, str) and creds):
        raise ConfigError(f"NATS connection file {path} lacks url or credentials")
    return NatsEndpoint(url=url, auth=_credentials(Path(creds)))


def cli_target(settings: Settings, command: str) -> tuple[list[str], NatsAuth]:
    """Where a command-line tool (``rtnode replay``, ``rtnode consume``) connects, and how.

    What the command line (or the environment) says wins: ``--nats-url`` and any credentials.
    Otherwise the connection file in ``--data-dir`` (written by a node running its embedded
    NATS) gives the URL, and its credentials are used when that URL is the one connected to.

    Raises:
        ConfigError: No URL at all, or unusable credentials.
    """
    auth = NatsAuth.from_settings(settings)
    servers = list(settings.nats_url)
    if servers and auth.configured:
        return servers, auth
    endpoint = read_connection_file(settings.data_dir)
    if not servers:
        if endpoint is None:
            raise ConfigError(
                f"{command} needs --nats-url (or RTNODE_NATS_URL), or the --data-dir of a "
                f"running node with an embedded NATS (no {settings.data_dir / CONNECTION_FILE})")
        servers = [endpoint.url]
    if not auth.configured and endpoint is not None and endpoint.url in servers:
        auth = endpoint.auth.with_tls_of(auth)
    return servers, auth


def connect_refusal(exc: BaseException, auth: NatsAuth) -> str:
    """Why a failed connect cannot succeed by retrying ("" when it might).

    A server refusing the credentials, or a certificate that does not verify, stays so: say
    which setting to look at instead of retrying until the deadline.
    """
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(
            exc).lower():
        hint = ("" if auth.configured else ": set nats_user/nats_password, nats_token, "
                "nats_nkey_seed or nats_creds")
        return f"refused the connection ({auth.method}): authorization violation{hint}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"has a certificate that does not verify: {exc.verify_message} (nats_tls_ca)"
    return ""
