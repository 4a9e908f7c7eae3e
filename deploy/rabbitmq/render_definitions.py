"""Render ``definitions.json`` for RabbitMQ with each user's password hash.

The committed ``definitions.json`` holds the vhost, the role users and their permissions, and no
password. This script adds ``password_hash`` for every user from the environment (the password of
user ``amqpsched-worker`` is in ``RABBITMQ_PASSWORD_AMQPSCHED_WORKER``), so the result can be
loaded at boot (``load_definitions``) or imported with ``rabbitmqctl import_definitions``.
Python standard library only: the Kubernetes init container runs it on a plain Python image.

    RABBITMQ_PASSWORD_AMQPSCHED_CLIENT=... (one per user) \\
        python render_definitions.py --in definitions.json --out rendered.json

``--default-user-conf`` adds an administrator from a ``default_user``/``default_pass`` file (the
RabbitMQ Cluster Operator's ``default_user.conf``): RabbitMQ creates no default user when it
loads definitions at boot, so the operator's own user must be among them.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
ENV_PREFIX = "RABBITMQ_PASSWORD_"


def env_name(user: str) -> str:
    """The environment variable holding ``user``'s password."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", user).upper()


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def read_default_user(path: Path) -> tuple[str, str]:
    """``default_user`` and ``default_pass`` of a rabbitmq.conf-style file."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    try:
        return values["default_user"], values["default_pass"]
    except KeyError as exc:
        raise SystemExit(f"{path}: no {exc.args[0]}") from None


def render(
    definitions: dict[str, Any],
    passwords: dict[str, str],
    *,
    admin: tuple[str, str] | None = None,
    allow_passwordless: bool = False,
) -> dict[str, Any]:
    """A copy of ``definitions`` with a password hash for each user (``passwords`` by name)."""
    out = json.loads(json.dumps(definitions))
    missing = []
    for user in out.get("users", []):
        password = passwords.get(user["name"])
        if password:
            user["password_hash"] = password_hash(password)
            user["hashing_algorithm"] = HASHING_ALGORITHM
        elif not allow_passwordless:
            missing.append(env_name(user["name"]))
    if missing:
        raise SystemExit("no password for: " + ", ".join(missing))
    if admin is not None:
        name, password = admin
        out.setdefault("users", []).append(
            {
                "name": name,
                "password_hash": password_hash(password),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": "administrator",
                "limits": {},
            }
        )
        vhosts = out.setdefault("vhosts", [])
        if not any(v["name"] == "/" for v in vhosts):
            vhosts.append({"name": "/"})
        out.setdefault("permissions", []).extend(
            {"user": name, "vhost": v["name"], "configure": ".*", "write": ".*", "read": ".*"}
            for v in vhosts
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in", dest="source", type=Path, required=True, help="definitions.json")
    parser.add_argument("--out", type=Path, help="where to write (default: standard output)")
    parser.add_argument("--default-user-conf", type=Path, help="add this administrator")
    parser.add_argument(
        "--allow-passwordless",
        action="store_true",
        help="leave users without a password in the environment passwordless",
    )
    args = parser.parse_args(argv)
    definitions = json.loads(args.source.read_text(encoding="utf-8"))
    passwords = {
        user["name"]: os.environ.get(env_name(user["name"]), "")
        for user in definitions.get("users", [])
    }
    admin = read_default_user(args.default_user_conf) if args.default_user_conf else None
    rendered = render(
        definitions, passwords, admin=admin, allow_passwordless=args.allow_passwordless
    )
    text = json.dumps(rendered, indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
