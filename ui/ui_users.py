"""The chat UI's users file: one `name:hash` line per user, the hash scrypt with its own salt.

    scrypt$16384$8$1$<salt, base64>$<key, base64>

Lines that are empty or start with `#` are ignored. No password is ever stored, only its hash.
Standard library only: the UI (app.py) imports it, and operators run it with any Python 3:

    python3 ui/ui_users.py add /etc/ernie-mesh/ui-users alice   # asks for the password twice
    python3 ui/ui_users.py hash < password.txt                   # prints a hash (Ansible vars)
    python3 ui/ui_users.py remove /etc/ernie-mesh/ui-users alice
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
from pathlib import Path

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # 16 MiB and ~50 ms per check: slows guessing, cheap for a login
SALT_BYTES = 16
KEY_BYTES = 32
MIN_PASSWORD_CHARS = 8
NAME_RE = re.compile(r"^[A-Za-z0-9._@+-]{1,64}$")


class UsersFileError(ValueError):
    """The file is unreadable or a line is malformed: the message names the file and the line."""


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES)
    b64 = lambda b: base64.b64encode(b).decode()
    return f"{SCHEME}${n}${r}${p}${b64(salt)}${b64(key)}"


def _parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError(f"not a {SCHEME}$N$r$p$salt$key hash")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError as e:
        raise ValueError(f"malformed hash ({e})") from None
    if n < 2**10 or n & (n - 1) or not (1 <= r <= 64) or not (1 <= p <= 16) or len(salt) < 8 or len(key) < 16:
        raise ValueError("hash parameters out of range (N a power of 2 >= 1024, salt >= 8 bytes, key >= 16)")
    return n, r, p, salt, key


def verify_password(password: str, stored: str) -> bool:
    n, r, p, salt, key = _parse_hash(stored)
    got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r * p, dklen=len(key))
    return hmac.compare_digest(got, key)


# Checked for an unknown name, so that a wrong name costs as long as a wrong password.
_DUMMY = hash_password(secrets.token_hex(16))


def load_users(path: str | Path, *, allow_empty: bool = False) -> dict[str, str]:
    """name -> hash. Raises UsersFileError naming the file (and line) when anything is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsersFileError(f"{path}: cannot read the UI users file ({e.strerror or e})") from None
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not NAME_RE.match(name):
            raise UsersFileError(f"{path}:{number}: expected name:hash (name of letters, digits, ._@+-)")
        try:
            _parse_hash(stored)
        except ValueError as e:
            raise UsersFileError(
                f"{path}:{number}: {e}; make one with `python3 ui/ui_users.py add {path} {name}`"
            ) from None
        if name in users:
            raise UsersFileError(f"{path}:{number}: user {name!r} is listed twice")
        users[name] = stored
    if not users and not allow_empty:
        raise UsersFileError(f"{path}: no user in the UI users file (add one with `python3 ui/ui_users.py add`)")
    return users


def check(users: dict[str, str], name: str, password: str) -> bool:
    stored = users.get(name)
    ok = verify_password(password, stored or _DUMMY)
    return ok and stored is not None


def _write(path: Path, users: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# ernie-mesh chat UI users: name:scrypt hash (python3 ui/ui_users.py add FILE NAME)\n")
        for name, stored in users.items():
            f.write(f"{name}:{stored}\n")
    os.replace(tmp, path)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("error: the two passwords differ")
    if len(password) < MIN_PASSWORD_CHARS:
        raise SystemExit(f"error: a password needs at least {MIN_PASSWORD_CHARS} characters")
    return password


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ui_users.py", description="Manage the chat UI's users file.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="add a user, or set a user's password (the file is created, mode 0600)")
    add.add_argument("file")
    add.add_argument("name")
    add.add_argument("--stdin", action="store_true", help="read the password from stdin's first line")
    rm = sub.add_parser("remove", help="remove a user")
    rm.add_argument("file")
    rm.add_argument("name")
    h = sub.add_parser("hash", help="print the hash of a password (stdin's first line, or asked)")
    h.add_argument("--stdin", action="store_true", help="read the password from stdin's first line")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "hash":
            print(hash_password(_read_password(args.stdin or not sys.stdin.isatty())))
            return 0
        if not NAME_RE.match(args.name):
            raise SystemExit("error: a user name is 1-64 letters, digits or ._@+-")
        path = Path(args.file)
        users = load_users(path, allow_empty=True) if path.exists() else {}
        if args.cmd == "add":
            users[args.name] = hash_password(_read_password(args.stdin))
        elif users.pop(args.name, None) is None:
            raise SystemExit(f"error: no user {args.name!r} in {path}")
        _write(path, users)
    except UsersFileError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.cmd}: {args.name} in {path} (the UI reads the file at each login: no restart)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
