"""mesh.gossip_keys: where an agent's gossip keys come from at start (secure by default)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from gossip import join_token
from gossip.keyring_store import load_keyring, save_keyring
from gossip.security import Keyring
from mesh.gossip_keys import KEYRING_NAME, LABEL_NAME, GossipKeysError, resolve
from mesh.gossip_keys import join_token as print_token

K1 = bytes(range(32))
K2 = bytes(range(64, 96))


def start(data_dir: Path, **given: Any) -> Any:
    args: dict[str, Any] = {
        "keyring": None,
        "token": None,
        "insecure": False,
        "joins": False,
        "label": "",
    }
    args.update(given)
    data_dir.mkdir(exist_ok=True)  # the agent has locked (and so made) it already
    return resolve(data_dir, **args)


def test_a_first_node_makes_a_private_keyring_and_reuses_it(tmp_path: Path) -> None:
    first = start(tmp_path)
    path = tmp_path / KEYRING_NAME
    assert (first.keyring, first.source) == (path, "created")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = load_keyring(path).keys()
    assert len(keys) == 1 and len(keys[0]) == 32
    again = start(tmp_path)
    assert (again.source, load_keyring(path).keys()) == ("data_dir", keys)
    assert [p.name for p in tmp_path.iterdir()] == [KEYRING_NAME]  # no temporary left


def test_two_first_nodes_get_different_keys(tmp_path: Path) -> None:
    start(tmp_path / "a")
    start(tmp_path / "b")
    a = load_keyring(tmp_path / "a" / KEYRING_NAME).keys()
    assert a != load_keyring(tmp_path / "b" / KEYRING_NAME).keys()


def test_a_joiner_without_a_key_is_refused_naming_the_options(tmp_path: Path) -> None:
    with pytest.raises(GossipKeysError) as caught:
        start(tmp_path, joins=True)
    for option in ("--token", "MESH_JOIN_TOKEN", "--token-file", "--keyring", "--insecure-gossip"):
        assert option in str(caught.value)
    assert not (tmp_path / KEYRING_NAME).exists()


def test_a_joiner_stores_the_tokens_keys_and_label(tmp_path: Path) -> None:
    token = join_token.decode(join_token.encode([K1, K2], "prod"))
    keys = start(tmp_path, joins=True, token=token, label="prod")
    assert (keys.source, keys.label) == ("token", "prod")
    assert load_keyring(tmp_path / KEYRING_NAME).keys() == [K1, K2]
    assert (tmp_path / LABEL_NAME).read_text() == "prod"
    assert stat.S_IMODE((tmp_path / LABEL_NAME).stat().st_mode) == 0o600
    # Restarted without the token: the keyring and the label stay.
    again = start(tmp_path, joins=True)
    assert (again.source, again.label, again.keyring) == ("data_dir", "prod", keys.keyring)


def test_the_data_dirs_keyring_wins_over_a_stale_token(tmp_path: Path) -> None:
    save_keyring(tmp_path / KEYRING_NAME, Keyring([K2]))  # rotated since the token
    token = join_token.decode(join_token.encode([K1]))
    keys = start(tmp_path, joins=True, token=token)
    assert (keys.source, keys.token_ignored) == ("data_dir", True)
    assert load_keyring(tmp_path / KEYRING_NAME).keys() == [K2]


def test_insecure_and_an_explicit_keyring_touch_nothing(tmp_path: Path) -> None:
    assert start(tmp_path, insecure=True, joins=True).keyring is None
    assert start(tmp_path, keyring=Path("/etc/k"), joins=True).keyring == Path("/etc/k")
    assert list(tmp_path.iterdir()) == []


def test_join_token_prints_the_data_dirs_keys_and_label(tmp_path: Path) -> None:
    start(tmp_path, label="blue")
    token = join_token.decode(print_token(tmp_path))
    assert list(token.keys) == load_keyring(tmp_path / KEYRING_NAME).keys()
    assert token.label == "blue"
    assert join_token.decode(print_token(tmp_path, label="red")).label == "red"


def test_join_token_without_a_keyring_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(GossipKeysError, match=str(tmp_path / KEYRING_NAME)):
        print_token(tmp_path)


def test_an_unreadable_label_is_a_start_error(tmp_path: Path) -> None:
    (tmp_path / LABEL_NAME).write_bytes(os.urandom(8) + b"\xff\xfe")
    with pytest.raises(GossipKeysError, match=LABEL_NAME):
        start(tmp_path)


def test_a_node_that_ran_in_plaintext_is_not_switched_to_a_key_of_its_own(
    tmp_path: Path,
) -> None:
    """An upgraded node of a plaintext cluster: a new key would cut it off silently."""
    with pytest.raises(GossipKeysError) as caught:
        start(tmp_path, fresh=False)
    for option in ("--insecure-gossip", "--keyring", "--token", "docs/gossip.md"):
        assert option in str(caught.value)
    assert not (tmp_path / KEYRING_NAME).exists()
    # Its keyring, once it has one, is used as any other node's.
    save_keyring(tmp_path / KEYRING_NAME, Keyring([K1]))
    assert start(tmp_path, fresh=False).source == "data_dir"
