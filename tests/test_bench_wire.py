"""The wire benchmark's counting, checked against a real tcpdump capture of a known exchange on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from bench_wire import DutyCycle, PcapError, capture, idle_window, month_mb, parse_pcap, tally  # noqa: E402


@pytest.mark.skipif(shutil.which("tcpdump") is None or os.geteuid() != 0, reason="needs tcpdump (make deps) and root")
def test_capture_counts_each_direction_ip_bytes_and_payload(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pcap = tmp_path / "known.pcap"
    with capture(pcap, port) as command:
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        client.sendall(b"u" * 1000)
        received = b""
        while len(received) < 1000:
            received += server.recv(4096)
        server.sendall(b"d" * 37)
        assert client.recv(4096) == b"d" * 37
        client.close()
        server.close()
    listener.close()
    assert "tcpdump -i lo" in command[0]
    packets = parse_pcap(pcap.read_bytes(), port)
    whole = tally(packets, 0, float("inf"))
    assert sum(p.payload for p in packets if p.upstream) == 1000
    assert sum(p.payload for p in packets if not p.upstream) == 37
    assert whole.up + whole.down == whole.ip_bytes
    # SYN, SYN-ACK, ACK, two data segments (and their ACKs), FINs: every packet carries IPv4 + TCP headers.
    assert whole.packets >= 6
    assert all(p.ip_bytes >= p.payload + 40 for p in packets)
    assert sum(p.syn and not p.upstream for p in packets) == 1  # one SYN-ACK: one connection opened


def test_not_a_pcap_is_refused() -> None:
    with pytest.raises(PcapError, match="not a classic pcap"):
        parse_pcap(b"\x0a\x0d\x0d\x0a" + bytes(40), 443)  # pcapng is not read: tcpdump -w writes classic pcap


def test_month_of_a_duty_cycle() -> None:
    idle, reads, sheds = month_mb(DutyCycle(), idle_bps=200.0, read_bytes=250.0, shed_bytes=900.0)
    assert round(idle, 1) == 64.8  # 200 bps for 30 days: the idle figure of issue 11
    assert round(reads, 2) == 10.80  # 43,200 reads of 250 bytes
    assert round(sheds, 3) == 0.054  # 60 sheds of 900 bytes


def test_idle_window_is_a_whole_number_of_ping_intervals() -> None:
    assert idle_window(20.0) == 120.0
    assert idle_window(120.0) == 120.0
    assert idle_window(50.0) == 150.0
    assert idle_window(300.0) == 300.0
