"""``orchestrator keys``: CURVE key pairs and the secure broker's allow-list.

The allow-list is ``<data dir>/keys/authorized.json``; a running secure broker reads it
again when it changes, so ``authorize`` and ``revoke`` need no restart (for new
connections: libzmq cannot drop one peer of a bound socket, so a connection made before
a revoke stays up until it closes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.common import (
    NAME, TEXT, Context, DataDirGroup, DirPath, Text, emit_json, fail, json_option,
)

KEYS_HELP = """CURVE keys for `start --secure`: key pairs, and who the broker accepts.

A secure broker accepts only the public keys in its allow-list
(DATA_DIR/keys/authorized.json). Give a remote agent or client its secret key file and the
broker's public key (DATA_DIR/keys/broker.key) with ORCH_CURVE_KEY_FILE and
ORCH_CURVE_SERVER_KEY_FILE (or ORCH_CURVE_SERVER_KEY).
"""
GENERATE_HELP = """Create a key pair: NAME.key (public) and NAME.key_secret (secret, 0600).

By default in DATA_DIR/keys; give the secret file only to the process that uses it. With
--role (not broker) the public key is also authorized at once.
"""
AUTHORIZE_HELP = """Let a public key connect to the secure broker, with a role.

PUBLIC_KEY_OR_FILE is the 40-character Z85 key or a key file (NAME.key or
NAME.key_secret); quote the key, and put `--` before one that starts with `-`. Takes
effect for new connections without a restart. Roles: an agent key runs tasks (bind it to
names and capabilities with --name and --capability); a client key submits tasks and
sees only its own; admin may do everything; node is for node supervisors. See
docs/security.md.
"""
REVOKE_HELP = """Remove a public key from the allow-list.

New connections with that key are refused at once, without a restart. A connection made
before cannot be dropped (libzmq cannot drop one peer of a bound socket), but within a
heartbeat interval the broker refuses its messages with `unauthorized`, removes the
registrations of its agents and dispatches their tasks again elsewhere.
"""
#: Roles a key may be generated or authorized for (``broker`` only for generate).
AUTHORIZE_ROLES = ("agent", "client", "node", "admin")


def _keys() -> Any:
    """The key helpers (imported on use: zmq is only needed by these commands)."""
    import wire.curve as curve

    return curve


class PublicKey(click.ParamType):
    """A CURVE public key: the 40 Z85 characters, or a key file holding it (a bad one
    is a usage error, exit 2)."""

    name = "public_key_or_file"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = TEXT.convert(value, param, ctx)
        curve = _keys()
        try:
            return str(curve.read_public_key(text))
        except curve.KeyFileError as e:
            self.fail(str(e), param, ctx)


class KeyName(Text):
    """A key pair's file name stem: printable, no ``/``, not starting with ``.``."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        name = super().convert(value, param, ctx)
        if "/" in name or name.startswith(".") or name.strip() != name:
            self.fail(f"--name must be a plain file name, got {name!r}", param, ctx)
        return name


PUBLIC_KEY = PublicKey()
KEY_NAME = KeyName("name", non_empty=True, printable=True, max_chars=200)


@click.group(cls=DataDirGroup, help=KEYS_HELP)
def keys() -> None:
    """The ``keys`` group."""


@keys.command(help=GENERATE_HELP)
@click.option("--name", type=KEY_NAME, default="client", show_default=True,
              help="File name stem: NAME.key and NAME.key_secret.")
@click.option("--role", type=click.Choice(("broker",) + AUTHORIZE_ROLES), default=None,
              help="Also authorize the key with this role (broker: the broker's own pair).")
@click.option("--dir", "directory", type=DirPath(), default=None,
              help="Where to write the files. Default: DATA_DIR/keys.")
@click.option("--comment", type=TEXT, default="",
              help="A note kept in the allow-list with --role.")
@json_option("Print the key and the files as JSON.")
@click.pass_obj
def generate(obj: Context, name: str, role: str | None, directory: Path | None, comment: str,
             as_json: bool) -> None:
    """Write a key pair; with --role, authorize it."""
    from broker.security import authorize, authorized_path

    curve = _keys()
    target = directory or curve.keys_dir(obj.home)
    try:
        public_path, secret_path = curve.write_key_pair(target, name)
        public_key = curve.read_keys(public_path)["public"]
        if role is not None and role != "broker":
            authorize(authorized_path(obj.home), public_key, role, comment, [name])
    except curve.KeyFileError as e:
        fail(str(e), 1)  # a pair of that name exists already, or an unreadable list
    except OSError as e:
        fail(f"cannot write the key files in {target}: {e.strerror or e}", 1)
    document = {"name": name, "public_key": public_key, "public_file": str(public_path),
                "secret_file": str(secret_path),
                "authorized": role if role not in (None, "broker") else None}
    if as_json:
        emit_json(document)
        return
    click.echo(f"public key {public_key}")
    click.echo(f"wrote {public_path} and {secret_path} (secret: keep it 0600)")
    if document["authorized"]:
        click.echo(f"authorized as {role}")


@keys.command(help=AUTHORIZE_HELP)
@click.argument("public_key_or_file", type=PUBLIC_KEY)
@click.option("--role", type=click.Choice(AUTHORIZE_ROLES), default=None,
              help="[default: agent with --name or --capability, else client]")
@click.option("--comment", type=TEXT, default="", help="A note kept with the key.")
@click.option("--name", "names", type=NAME, multiple=True,
              help="An agent name the key may register under (repeat; default: any).")
@click.option("--capability", "capabilities", type=NAME, multiple=True,
              help="A capability the agent key may offer (repeat; default: any).")
@json_option("Print the entry as JSON.")
@click.pass_obj
def authorize(obj: Context, public_key_or_file: str, role: str | None, comment: str,
              names: tuple[str, ...], capabilities: tuple[str, ...], as_json: bool) -> None:
    """Add a key to the allow-list."""
    from broker.security import authorize as add, authorized_path

    public_key = public_key_or_file
    path = authorized_path(obj.home)
    role = role or ("agent" if names or capabilities else "client")
    if (names or capabilities) and role != "agent":
        fail("--name and --capability bind agent keys: use them with --role agent", 2)
    try:
        entry = add(path, public_key, role, comment, list(names), list(capabilities))
    except _keys().KeyFileError as e:
        fail(str(e), 1)
    except OSError as e:
        fail(f"cannot write the allow-list {path}: {e.strerror or e}", 1)
    if as_json:
        emit_json({"public_key": public_key, **entry, "file": str(path)})
    else:
        click.echo(f"authorized {public_key} as {role} in {path}")
        if role == "agent" and not names and not capabilities:
            click.echo("note: this agent key may register under any name and capability; "
                       "bind it with --name and --capability", err=True)


@keys.command(help=REVOKE_HELP)
@click.argument("public_key_or_file", type=PUBLIC_KEY)
@json_option("Print what was removed as JSON.")
@click.pass_obj
def revoke(obj: Context, public_key_or_file: str, as_json: bool) -> None:
    """Remove a key from the allow-list (exit 1 when it was not in it)."""
    from broker.security import authorized_path, revoke as remove

    public_key = public_key_or_file
    path = authorized_path(obj.home)
    try:
        entry = remove(path, public_key)
    except _keys().KeyFileError as e:
        fail(str(e), 1)
    except OSError as e:
        fail(f"cannot write the allow-list {path}: {e.strerror or e}", 1)
    if entry is None:
        fail(f"{public_key} is not in the allow-list {path}", 1,
             {"public_key": public_key, "revoked": False})
    if as_json:
        emit_json({"public_key": public_key, "revoked": True, **entry, "file": str(path)})
    else:
        click.echo(f"revoked {public_key} (new connections with it are refused; the broker "
                   "refuses the messages of one open now and re-dispatches its agents' tasks)")


@keys.command(name="list")
@json_option("Print the allow-list as JSON.")
@click.pass_obj
def list_keys(obj: Context, as_json: bool) -> None:
    """The allow-list: each authorized key, its role, names and comment."""
    from broker.security import authorized_path, load_authorized

    path = authorized_path(obj.home)
    try:
        entries = load_authorized(path)
    except _keys().KeyFileError as e:
        fail(str(e), 1)
    if as_json:
        emit_json({"file": str(path),
                   "keys": [{"public_key": key, **entry} for key, entry in entries.items()]})
        return
    if not entries:
        click.echo(f"no key is authorized ({path})")
    for key, entry in sorted(entries.items(), key=lambda item: item[1].get("added_at", 0)):
        names = ",".join(entry.get("names") or []) or "-"
        caps = ",".join(entry.get("capabilities") or []) or "-"
        click.echo(f"{key}  {entry['role']:<6} {names}  {caps}  "
                   f"{entry.get('comment', '')}".rstrip())
