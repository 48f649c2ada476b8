"""The control plane comes back where it was: the port is recorded in its state dir and reused."""

from __future__ import annotations

import socket
from pathlib import Path

from sandbox.controlplane import ControlPlane
from sandbox.controlplane.endpoint import PORT_FILE, read_endpoint, read_port

from tests.worker.helpers import free_port


def test_a_restarted_control_plane_listens_on_its_recorded_port(tmp_path: Path) -> None:
    sd = tmp_path / "cp"
    port = free_port()
    with ControlPlane(sd, port=port) as cp:
        first = cp.base_url
    assert read_port(sd) == port  # kept after stop (endpoint.json is not)
    with ControlPlane(sd, port=None) as cp:  # no port given: the recorded one
        assert cp.base_url == first and read_endpoint(sd).base_url == first


def test_when_the_recorded_port_is_taken_it_listens_elsewhere_and_records_that(tmp_path: Path) -> None:
    sd = tmp_path / "cp"
    port = free_port()
    with ControlPlane(sd, port=port):
        pass
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        with ControlPlane(sd, port=None) as cp:
            moved = int(cp.base_url.rsplit(":", 1)[1])
            assert moved != port and read_port(sd) == moved and read_endpoint(sd).base_url == cp.base_url


def test_an_unreadable_port_file_is_ignored(tmp_path: Path) -> None:
    sd = tmp_path / "cp"
    sd.mkdir(mode=0o700)
    (sd / PORT_FILE).write_text("not a port\n")
    assert read_port(sd) is None
