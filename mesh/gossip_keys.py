"""Where an agent's gossip keys come from at start: secure by default (docs/gossip.md).

Gossip is encrypted unless the operator says `--insecure-gossip`. In order:

1. `--insecure-gossip`: no keyring, plaintext (the agent logs a warning).
2. `--keyring FILE`: that file, as before (changes by `mesh keyring` are written to it).
3. The data dir's keyring (`keyring.json`): a node that started before. It wins
   over a join token given again at a restart, as Consul's data-dir keyring
   wins over `-encrypt`: it holds the keys as rotated since the token was
   printed.
4. A join token (`--token`, `--token-file`, MESH_JOIN_TOKEN): its keys become
   the data dir's keyring.
5. No `--join` and a fresh data dir: the first node of a new cluster makes a
   keyring of one new key.
6. Otherwise a start error naming the options. A node never joins in
   plaintext by accident; and a node whose data dir holds a state but no
   keyring (it ran with plaintext gossip before this version) is not switched
   to a key of its own, which would cut it off from its plaintext cluster
   without a word: it is told to say `--insecure-gossip` or to move the
   cluster to encryption.

The cluster label lives beside it (`cluster-label`): a token's, else
`--cluster-label`, else the one stored, so that a node restarted without its
token keeps the label `mesh join-token` printed. Both files are 0600 and
written atomically (a private temporary file, fsync, rename).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gossip.join_token import JoinToken
from gossip.join_token import encode as encode_token
from gossip.keyring_store import load_keyring, save_keyring, write_private
from gossip.security import Keyring, KeyringError

#: the agent's keyring in its data dir (the keyring file format of `--keyring`)
KEYRING_NAME: Final = "keyring.json"
#: the cluster label the keyring goes with, UTF-8
LABEL_NAME: Final = "cluster-label"


class GossipKeysError(Exception):
    """The agent cannot start with these gossip keys; the message says what to do."""


@dataclass(frozen=True, slots=True)
class GossipKeys:
    """What gossip runs with: the keyring file (None: plaintext) and the label."""

    keyring: Path | None
    label: str
    #: insecure, file, data_dir, token or created: where the keys came from
    source: str
    #: a join token given, but the data dir's keyring (which wins) lacks its primary
    token_ignored: bool = False


def resolve(
    data_dir: Path,
    *,
    keyring: Path | None,
    token: JoinToken | None,
    insecure: bool,
    joins: bool,
    label: str,
    fresh: bool = True,
) -> GossipKeys:
    """The gossip keys to start with, making the data dir's keyring when it is the
    first start (see the module's docstring for the order). `label`: --cluster-label
    (a token's label when one is given; the config checked they agree); `fresh`: the
    data dir holds no state yet (no earlier start)."""
    if insecure:
        return GossipKeys(None, label, "insecure")
    if keyring is not None:
        return GossipKeys(keyring, label, "file")
    path = data_dir / KEYRING_NAME
    stored_label = read_label(data_dir)
    label = label or stored_label
    ignored = False
    if path.exists():
        existing = load_keyring(path)  # KeyringError (bad_file): a start error
        source = "data_dir"
        ignored = token is not None and token.keys[0] not in existing
    elif token is not None:
        save_keyring(path, token.keyring())
        source = "token"
    elif not joins and fresh:
        save_keyring(path, Keyring([os.urandom(32)]))
        source = "created"
    elif not joins:
        raise GossipKeysError(
            f"{data_dir} holds the state of a node that ran with plaintext gossip (no "
            "keyring): gossip is encrypted by default now; --insecure-gossip keeps this "
            "node plaintext, --keyring FILE or --token TOKEN gives it its cluster's key "
            "(moving a plaintext cluster to encryption: docs/gossip.md)"
        )
    else:
        raise GossipKeysError(
            "--join needs the cluster's gossip key, and this node has none: give "
            "--token TOKEN (printed by `mesh join-token` on a member), MESH_JOIN_TOKEN or "
            "--token-file FILE, or --keyring FILE; --insecure-gossip joins a plaintext "
            "cluster"
        )
    if label != stored_label:
        write_private(data_dir / LABEL_NAME, label.encode("utf-8"))
    return GossipKeys(path, label, source, ignored)


def read_label(data_dir: Path) -> str:
    """The label stored beside the data dir's keyring; empty when there is none."""
    try:
        return (data_dir / LABEL_NAME).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise GossipKeysError(f"cannot read {data_dir / LABEL_NAME}: {exc}") from None


def join_token(data_dir: Path, keyring: Path | None = None, label: str | None = None) -> str:
    """The join token of an agent's keyring (`mesh join-token`): its data dir's, or the
    file it runs with (`--keyring`), and its cluster label (the stored one by default)."""
    path = keyring or data_dir / KEYRING_NAME
    if not path.exists():
        raise GossipKeysError(
            f"no gossip keyring at {path}: start the agent first (without "
            "--insecure-gossip), or give the keyring file it runs with (--keyring FILE)"
        )
    try:
        keys = load_keyring(path).keys()
    except KeyringError as exc:
        raise GossipKeysError(str(exc)) from None
    return encode_token(keys, read_label(data_dir) if label is None else label)
