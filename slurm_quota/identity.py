"""Who is asking the service: MUNGE credentials bound to one request, and REMOTE_USER from a
trusted web front end.

Owns: encoding a credential for a request (the CLI), decoding it (the service) through
libmunge (ctypes; no munge or unmunge process per request), the request binding, and the
Identity a request carries. MUNGE itself does the cryptography, the expiry (the credential's
time-to-live) and the replay check (munged refuses a credential decoded before). It must not
decide what an identity may do (slurm_quota.roles) or read the ledger.

The payload of a credential is `slurm-quota/1 METHOD PATH?QUERY SHA256(BODY)`: a credential
captured on the wire is good for that one request only, and only once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import pwd
import threading
from dataclasses import dataclass
from typing import Any

from slurm_quota.errors import CredentialRefused, MungeUnavailable

# The header a CLI request carries its credential in: `Authorization: MUNGE <credential>`.
AUTH_SCHEME = "MUNGE"
PAYLOAD_PREFIX = "slurm-quota/1"
# munged's socket; SLURM_QUOTA_MUNGE_SOCKET overrides libmunge's default (/run/munge/...).
SOCKET_ENV = "SLURM_QUOTA_MUNGE_SOCKET"
# A credential lives this long (munged's default is 300 s): a request is sent at once.
CREDENTIAL_TTL_S = 60

# libmunge's munge_opt_t and munge_err_t (munge.h, stable since MUNGE 0.5).
_OPT_TTL = 4
_OPT_SOCKET = 8
_EMUNGE_SOCKET = 6
_EMUNGE_TIMEOUT = 7
_EMUNGE_CRED_INVALID = 14
_EMUNGE_CRED_EXPIRED = 15
_EMUNGE_CRED_REWOUND = 16
_EMUNGE_CRED_REPLAYED = 17


@dataclass(frozen=True)
class Identity:
    """Who sent a request: uid and name (None for anonymous), and how it was learnt."""

    uid: int | None
    name: str | None
    via: str  # "munge", "remote-user" or "anonymous"

    @property
    def anonymous(self) -> bool:
        return self.name is None


ANONYMOUS = Identity(uid=None, name=None, via="anonymous")


def request_payload(method: str, path_qs: str, body: bytes) -> bytes:
    """What a credential for one request carries: method, path with query, body digest."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{PAYLOAD_PREFIX} {method.upper()} {path_qs} {digest}".encode()


class _Lib:
    """libmunge.so.2 through ctypes, loaded once per process."""

    _lock = threading.Lock()
    _lib: Any = None
    _libc: Any = None

    @classmethod
    def get(cls) -> tuple[Any, Any]:
        with cls._lock:
            if cls._lib is None:
                name = ctypes.util.find_library("munge") or "libmunge.so.2"
                try:
                    lib = ctypes.CDLL(name)
                except OSError as err:
                    raise MungeUnavailable(
                        f"libmunge is not installed ({err}); install the package libmunge2 "
                        "(Debian) or munge-libs (EL)."
                    ) from err
                lib.munge_ctx_create.restype = ctypes.c_void_p
                lib.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
                lib.munge_ctx_destroy.restype = None
                lib.munge_ctx_strerror.argtypes = [ctypes.c_void_p]
                lib.munge_ctx_strerror.restype = ctypes.c_char_p
                lib.munge_strerror.argtypes = [ctypes.c_int]
                lib.munge_strerror.restype = ctypes.c_char_p
                lib.munge_encode.argtypes = [
                    ctypes.POINTER(ctypes.c_char_p),
                    ctypes.c_void_p,
                    ctypes.c_char_p,
                    ctypes.c_int,
                ]
                lib.munge_encode.restype = ctypes.c_int
                lib.munge_decode.argtypes = [
                    ctypes.c_char_p,
                    ctypes.c_void_p,
                    ctypes.POINTER(ctypes.c_void_p),
                    ctypes.POINTER(ctypes.c_int),
                    ctypes.POINTER(ctypes.c_uint32),
                    ctypes.POINTER(ctypes.c_uint32),
                ]
                lib.munge_decode.restype = ctypes.c_int
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.free.argtypes = [ctypes.c_void_p]
                libc.free.restype = None
                cls._lib, cls._libc = lib, libc
            return cls._lib, cls._libc


def _context(lib: Any, socket_path: str | None, ttl_s: int | None) -> Any:
    ctx = lib.munge_ctx_create()
    if not ctx:
        raise MungeUnavailable("libmunge could not create a context (out of memory).")
    # munge_ctx_set is variadic: the value's C type is given explicitly.
    if socket_path and lib.munge_ctx_set(
        ctypes.c_void_p(ctx), ctypes.c_int(_OPT_SOCKET), ctypes.c_char_p(socket_path.encode())
    ):
        lib.munge_ctx_destroy(ctx)
        raise MungeUnavailable(f"libmunge refused the socket path {socket_path!r}.")
    if ttl_s is not None:
        lib.munge_ctx_set(ctypes.c_void_p(ctx), ctypes.c_int(_OPT_TTL), ctypes.c_int(ttl_s))
    return ctx


def socket_path() -> str | None:
    """munged's socket: SLURM_QUOTA_MUNGE_SOCKET, else None (libmunge's default)."""
    return os.environ.get(SOCKET_ENV) or None


def encode(payload: bytes, *, ttl_s: int = CREDENTIAL_TTL_S, socket: str | None = None) -> str:
    """A MUNGE credential of the calling process's uid carrying payload."""
    try:
        lib, libc = _Lib.get()
    except MungeUnavailable as err:
        raise MungeUnavailable(f"Cannot prove who you are to the service: {err}") from err
    ctx = _context(lib, socket or socket_path(), ttl_s)
    cred = ctypes.c_char_p()
    try:
        err = lib.munge_encode(ctypes.byref(cred), ctx, payload, len(payload))
        if err:
            message = (lib.munge_ctx_strerror(ctx) or b"unknown error").decode(errors="replace")
            raise MungeUnavailable(
                f"Cannot prove who you are to the service: MUNGE says: {message}. Is munged "
                "running on this host (systemctl status munge)?"
            )
        return (cred.value or b"").decode("ascii")
    finally:
        if cred:
            libc.free(ctypes.cast(cred, ctypes.c_void_p))
        lib.munge_ctx_destroy(ctx)


_REFUSED = {
    _EMUNGE_CRED_EXPIRED: "the MUNGE credential has expired (was the request delayed, or are "
    "the clocks of this host and the controller apart?)",
    _EMUNGE_CRED_REWOUND: "the MUNGE credential was made in the future (the clocks of the "
    "two hosts are apart)",
    _EMUNGE_CRED_REPLAYED: "the MUNGE credential was used before (a replayed request)",
    _EMUNGE_CRED_INVALID: "the MUNGE credential is not valid (not made by this cluster's "
    "munged, or altered)",
}


def decode(credential: str, *, socket: str | None = None) -> tuple[int, bytes]:
    """(uid, payload) of a credential; CredentialRefused when munged does not vouch for it,
    MungeUnavailable when munged does not answer."""
    lib, libc = _Lib.get()
    ctx = _context(lib, socket or socket_path(), None)
    buf = ctypes.c_void_p()
    length = ctypes.c_int(0)
    uid = ctypes.c_uint32(0)
    gid = ctypes.c_uint32(0)
    try:
        err = lib.munge_decode(
            credential.encode("ascii", "replace"),
            ctx,
            ctypes.byref(buf),
            ctypes.byref(length),
            ctypes.byref(uid),
            ctypes.byref(gid),
        )
        payload = ctypes.string_at(buf, length.value) if buf.value else b""
        if err in (_EMUNGE_SOCKET, _EMUNGE_TIMEOUT):
            message = (lib.munge_ctx_strerror(ctx) or b"").decode(errors="replace")
            raise MungeUnavailable(f"munged did not answer: {message}.")
        if err:
            reason = _REFUSED.get(err)
            if reason is None:
                detail = (lib.munge_ctx_strerror(ctx) or b"").decode(errors="replace")
                reason = f"the MUNGE credential was refused ({detail})"
            raise CredentialRefused(reason[0].upper() + reason[1:] + ".")
        return int(uid.value), payload
    finally:
        if buf.value:
            libc.free(buf)
        lib.munge_ctx_destroy(ctx)


def credential_header(method: str, path_qs: str, body: bytes = b"") -> dict[str, str]:
    """The Authorization header of one request of the calling user."""
    return {"Authorization": f"{AUTH_SCHEME} {encode(request_payload(method, path_qs, body))}"}


def user_name(uid: int) -> str:
    """The passwd name of uid, or `uid N` when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def from_request(
    environ: dict[str, Any],
    body: bytes,
    *,
    trust_remote_user: bool = False,
    socket: str | None = None,
) -> Identity:
    """The Identity of a WSGI request: a MUNGE credential bound to it, else REMOTE_USER when
    the site trusts its front end, else anonymous. CredentialRefused for a bad credential."""
    header = str(environ.get("HTTP_AUTHORIZATION", "")).strip()
    if header:
        scheme, _, credential = header.partition(" ")
        if scheme != AUTH_SCHEME or not credential.strip():
            raise CredentialRefused(
                f"Only `Authorization: {AUTH_SCHEME} <credential>` is accepted here."
            )
        uid, payload = decode(credential.strip(), socket=socket)
        query = str(environ.get("QUERY_STRING", ""))
        path_qs = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", "") or "/")
        if query:
            path_qs += "?" + query
        method = str(environ.get("REQUEST_METHOD", "GET"))
        # HEAD is GET without the body: a credential made for the GET covers it.
        wanted = {request_payload(method, path_qs, body)}
        if method.upper() == "HEAD":
            wanted.add(request_payload("GET", path_qs, body))
        if payload not in wanted:
            raise CredentialRefused(
                "The MUNGE credential was made for another request (method, path or body "
                "differ): it cannot be reused."
            )
        return Identity(uid=uid, name=user_name(uid), via="munge")
    if trust_remote_user:
        name = str(environ.get("REMOTE_USER") or environ.get("HTTP_X_REMOTE_USER") or "").strip()
        if name:
            try:
                uid: int | None = pwd.getpwnam(name).pw_uid
            except KeyError:
                uid = None
            return Identity(uid=uid, name=name, via="remote-user")
    return ANONYMOUS
