"""Access control of the serving stack: one shared secret, and the web UI's users.

The controller, each model worker and the web UI demand the secret of every request
(`Authorization: Bearer <secret>`; HTTP 401 otherwise) and send it to one another. It is
read from the environment, never from a command line (which any user sees in `ps`):

    FEALLM_SERVE_SECRET=<secret>          the secret itself, or
    FEALLM_SERVE_SECRET_FILE=<path>       a file holding it (first line; mode 600 advised)

No secret set: no check (the default, for a stack bound to 127.0.0.1). The web UI's
people log in with a name and password from a users file, one `name:scrypt$N$r$p$salt$hash`
line each, written by `python -m feallm_llava.integration.access add-user FILE NAME`.

Pure standard library: the UI's environment (no torch, no llava) imports it too.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import logging
import os
import secrets
import stat
import sys
from pathlib import Path

from feallm_llava.errors import FeallmError

log = logging.getLogger(__name__)

SECRET_ENV = "FEALLM_SERVE_SECRET"
SECRET_FILE_ENV = "FEALLM_SERVE_SECRET_FILE"
USERS_FILE_ENV = "FEALLM_UI_USERS_FILE"
HEADER = "authorization"
SCHEME = "Bearer"
MIN_SECRET_CHARS = 16  # a guessable secret is no access control
# scrypt cost (RFC 7914's interactive-login figures): ~50 ms a check on a CPU core
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1


class AccessError(FeallmError, ValueError):
    """A secret or users file that cannot be used; the message names it and what to do."""


# ------------------------------------------------------------------------- the secret

def read_secret(environ: dict[str, str] | None = None, secret_file: str | os.PathLike | None = None) -> str | None:
    """The shared secret: `secret_file`, else $FEALLM_SERVE_SECRET, else the file named by
    $FEALLM_SERVE_SECRET_FILE; None when none is set."""
    env = os.environ if environ is None else environ
    if secret_file is None and env.get(SECRET_ENV):
        return _checked(env[SECRET_ENV].strip(), f"${SECRET_ENV}")
    path = secret_file or env.get(SECRET_FILE_ENV)
    if not path:
        return None
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise AccessError(f"secret file {path}: cannot read it ({err.strerror or err})") from err
    _warn_if_shared(path)
    lines = text.splitlines()
    return _checked(lines[0].strip() if lines else "", f"secret file {path} (line 1)")


def _checked(secret: str, where: str) -> str:
    if len(secret) < MIN_SECRET_CHARS:
        raise AccessError(f"{where}: the secret has {len(secret)} characters, at least {MIN_SECRET_CHARS} "
                          f"are needed (make one: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if any(c.isspace() for c in secret):
        raise AccessError(f"{where}: the secret contains white space; use one word")
    return secret


def _warn_if_shared(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s is readable by other users (mode %o): chmod 600 %s", path, stat.S_IMODE(mode), path)


def auth_headers(secret: str | None) -> dict[str, str]:
    """What a request to a server of the stack carries (nothing when there is no secret)."""
    return {"Authorization": f"{SCHEME} {secret}"} if secret else {}


def authorized(header: str | None, secret: str) -> bool:
    """Whether an `Authorization` header value carries `secret` (constant-time comparison)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    return scheme.lower() == SCHEME.lower() and hmac.compare_digest(value.strip().encode(), secret.encode())


class RequireSecret:
    """ASGI middleware: every HTTP request and websocket must carry the secret, else 401.

    Wraps any ASGI app (upstream's FastAPI apps as they are); lifespan events pass.
    """

    def __init__(self, app, secret: str, realm: str = "feallm"):
        self.app = app
        self.secret = secret
        self.realm = realm

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == HEADER.encode()), None)
        if authorized(header, self.secret):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = b'{"detail": "unauthorized: this server needs the stack\'s shared secret (Authorization: Bearer ...)"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", f'{SCHEME} realm="{self.realm}"'.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------- the UI's users

def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.urlsafe_b64decode(salt), n=int(n), r=int(r), p=int(p))
    except ValueError:
        return False
    return hmac.compare_digest(got, base64.urlsafe_b64decode(digest))


def read_users(path: str | os.PathLike) -> dict[str, str]:
    """name -> stored hash, from a users file; a malformed line is named by its number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise AccessError(f"users file {path}: cannot read it ({err.strerror or err})") from err
    _warn_if_shared(path)
    users = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise AccessError(f"users file {path}, line {number}: expected NAME:scrypt$... (write users with "
                              f"python -m feallm_llava.integration.access add-user {path} NAME)")
        users[name] = stored
    if not users:
        raise AccessError(f"users file {path}: no users (python -m feallm_llava.integration.access add-user "
                          f"{path} NAME)")
    return users


def add_user(path: str | os.PathLike, name: str, password: str) -> None:
    """Add (or replace) `name` in the users file, created with mode 600."""
    if not name or ":" in name or any(c.isspace() for c in name):
        raise AccessError(f"user name {name!r}: one word without ':'")
    if len(password) < 8:
        raise AccessError("password: at least 8 characters")
    path = Path(path)
    kept = []
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.partition(":")[0].strip() != name]
    kept.append(f"{name}:{hash_password(password)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(kept) + "\n")


class UserCheck:
    """`check(name, password) -> bool` over a users file (Gradio's `auth=` callable)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.users = read_users(path)

    def __call__(self, name: str, password: str) -> bool:
        stored = self.users.get(name)
        ok = stored is not None and verify_password(password, stored)
        if not ok:
            log.warning("failed login for user %r", name)
        return ok


def main(argv: list[str] | None = None) -> int:
    """`python -m feallm_llava.integration.access add-user FILE NAME` (password from the
    terminal, or stdin's first line when it is not one)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "add-user":
        print("usage: python -m feallm_llava.integration.access add-user USERS_FILE NAME", file=sys.stderr)
        return 2
    password = getpass.getpass(f"password for {argv[2]}: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    try:
        add_user(argv[1], argv[2], password)
    except AccessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{argv[2]} written to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
