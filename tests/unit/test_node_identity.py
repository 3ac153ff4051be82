"""The node id never drifts: setting, else state file, else the host name written down."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from worker import node_identity
from worker.node_identity import NodeIdError, NodeIdSource, settle_node_id
from worker.settings import Settings


def _settings(state_dir: Path, **values: object) -> Settings:
    return Settings(state_dir=state_dir, **values)  # type: ignore[arg-type]


def test_the_setting_wins_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "node-id").write_text("from-file\n")
    identity = settle_node_id(_settings(tmp_path, node_id="appliance-7"), persist=True)
    assert (identity.node_id, identity.source) == ("appliance-7", NodeIdSource.SETTING)
    assert (tmp_path / "node-id").read_text() == "from-file\n"


def test_first_run_writes_the_host_name_and_later_starts_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"  # created on the first start
    monkeypatch.setattr(socket, "gethostname", lambda: "0123456789ab")
    looked = settle_node_id(_settings(state), persist=False)
    assert (looked.node_id, looked.source) == ("0123456789ab", NodeIdSource.HOST_NAME)
    assert not state.exists()  # only `run` writes it

    first = settle_node_id(_settings(state), persist=True)
    assert (first.node_id, first.source, first.unsaved) == (
        "0123456789ab",
        NodeIdSource.HOST_NAME,
        None,
    )
    assert (state / "node-id").read_text() == "0123456789ab\n"
    assert os.listdir(state) == ["node-id"]  # no temporary left

    monkeypatch.setattr(socket, "gethostname", lambda: "fedcba987654")  # a new container
    later = settle_node_id(_settings(state), persist=True)
    assert (later.node_id, later.source) == ("0123456789ab", NodeIdSource.STATE_FILE)


def test_a_file_written_meanwhile_by_another_process_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link

    def other_process_first(src: str, dst: str) -> None:
        Path(dst).write_text("other-node\n")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", other_process_first)
    identity = settle_node_id(_settings(tmp_path), persist=True)
    assert (identity.node_id, identity.source) == ("other-node", NodeIdSource.STATE_FILE)
    assert (tmp_path / "node-id").read_text() == "other-node\n"


@pytest.mark.parametrize("content", ["", "two words", "a*b", "x" * 65, "-" * 3 + "\n" * 2 + "y"])
def test_a_corrupt_state_file_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "node-id").write_text(content)
    with pytest.raises(NodeIdError, match="holds no valid node id"):
        settle_node_id(_settings(tmp_path), persist=True)


def test_an_unwritable_state_dir_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    identity = settle_node_id(_settings(blocker / "state"), persist=True)
    assert identity.source is NodeIdSource.HOST_NAME
    assert "cannot write" in str(identity.unsaved)


def test_an_id_that_looks_like_a_container_id_is_flagged_in_a_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / ".dockerenv"
    monkeypatch.setattr(node_identity, "_CONTAINER_MARKERS", (marker,))
    (tmp_path / "node-id").write_text("0123456789ab\n")
    identity = settle_node_id(_settings(tmp_path), persist=False)
    assert identity.container_warning() is None  # not in a container
    marker.write_text("")
    assert "looks like a container id" in str(identity.container_warning())
    explicit = settle_node_id(_settings(tmp_path, node_id="0123456789ab"), persist=False)
    assert explicit.container_warning() is None  # set on purpose
    (tmp_path / "node-id").write_text("appliance-1\n")
    assert settle_node_id(_settings(tmp_path), persist=False).container_warning() is None
