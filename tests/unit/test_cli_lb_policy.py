"""`mesh service create/update --affinity/--lb-algorithm`: shorthands for the mesh.lb labels."""

from __future__ import annotations

import pytest

from mesh.cli import service
from mesh.cli.errors import UsageError
from mesh.cli.main import build_parser
from mesh.cli.update import compute_patch


def test_create_turns_the_flags_into_labels() -> None:
    args = build_parser().parse_args(
        [
            "service", "create", "web", "--label", "team=a",
            "--affinity", "client-ip:600", "--lb-algorithm", "maglev",
        ]
    )  # fmt: skip
    assert service.create_body(args)["labels"] == {
        "team": "a",
        "mesh.lb.affinity": "client-ip:600",
        "mesh.lb.scheduler": "maglev",
    }
    bare = build_parser().parse_args(["service", "create", "web"])
    assert "labels" not in service.create_body(bare)


def test_update_adds_the_labels_and_keeps_the_others() -> None:
    args = build_parser().parse_args(["service", "update", "web", "--affinity", "none"])
    patch = compute_patch({"name": "web", "labels": {"team": "a"}}, service.changes_of(args))
    assert patch == {"labels": {"team": "a", "mesh.lb.affinity": "none"}}


def test_a_bad_affinity_is_refused_before_anything_is_sent() -> None:
    args = build_parser().parse_args(["service", "create", "web", "--affinity", "cookie"])
    with pytest.raises(UsageError, match="--affinity"):
        service.create_body(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["service", "create", "web", "--lb-algorithm", "random"])
