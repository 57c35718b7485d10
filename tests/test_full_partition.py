"""A full data partition, for real: a 64 KiB tmpfs filled up (needs root to mount; no mock of ENOSPC)."""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from lmgw.atomicfile import write_atomically
from lmgw.codes import RpcCode
from lmgw.modbus.shedding import ShedStore
from test_modbus_service import service, simulator, tcp_lm


@pytest.fixture
def partition(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "data"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (root needed): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            for _ in range(1024):  # bounded: 64 KiB is full long before 4 MiB
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return
    raise AssertionError("the partition never filled up")


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_one(partition: Path):
    target = partition / "state.json"
    write_atomically(target, b"old")
    fill(partition)
    with pytest.raises(OSError) as info:
        write_atomically(target, b"new")
    assert info.value.errno == errno.ENOSPC
    assert info.value.__context__ is None  # one error, not a second one chained by a re-flush on close
    assert target.read_bytes() == b"old" and names(partition) == ["filler", "state.json"]


def test_shed_on_a_full_data_partition_is_refused_cleanly_and_restores_still_happen(partition: Path, caplog):
    async def scenario():
        async with simulator() as (sim, port), \
                service(partition, [tcp_lm("lm1", port)], shed={"restore_retry": 30}) as gw:
            active = await gw.call("load.shed", lm="lm1", points=["relay_2"], duration_s=600)
            fill(partition)
            writes = len(sim[1].writes)
            caplog.clear()
            refused = await gw.error("load.shed", lm="lm1", points=["relay_1"], duration_s=60, shed_id="dso-9")
            assert refused.code == RpcCode.STATE_NOT_SAVED == -32021
            assert refused.message == "data partition full: shed refused, nothing written"
            assert refused.data == {"errno": "ENOSPC", "path": str(partition / "sheds.json")}
            assert len(sim[1].writes) == writes and sim[1].get("relay_1") is True  # nothing written at the LM
            assert names(partition) == ["filler", "sheds.json"]  # no temporary file left behind
            logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(logged) == 1 and logged[0].exc_info is None, logged  # one actionable line, no traceback
            assert "free space on the data partition" in logged[0].getMessage()
            assert "No space left on device" in gw.service.storage_problem  # gw.status shows it
            assert list(gw.service.book.sheds) == [active["shed_id"]]
            # restoring the loads does not wait for the disk
            await gw.advance(600)
            assert sim[1].get("relay_2") is True and gw.kinds()[-1] == "load.restored"
            assert ShedStore(partition / "sheds.json").load().sheds  # the file is behind: still lists it
            (partition / "filler").unlink()
            await gw.advance(30)  # saving is retried by the scheduler
            assert gw.service.storage_problem is None
            assert ShedStore(partition / "sheds.json").load().sheds == {}
            again = await gw.call("load.shed", lm="lm1", points=["relay_1"], duration_s=60, shed_id="dso-9")
            assert again["state"] == "active" and not again["duplicate"]
    asyncio.run(scenario())
