"""Size and save/load time of sheds.json with a full memory of finished sheds (printed, never asserted).

    .venv/bin/python tests/bench/bench_shed_store.py [N]      # N remembered sheds, default 1000
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))

from lmgw.modbus.shedding import Memory, Shed, ShedBook, ShedState, ShedStore  # noqa: E402


def main(count: int) -> None:
    logging.disable(logging.INFO)  # one line per state change is for the journal, not for this
    book = ShedBook(memory=Memory(entries=count))
    for n in range(count):
        shed_id, start = f"dso-{n:06d}-0123456789abcdef", 1.8e9 + n
        book.add(Shed(shed_id, "lm1", ["relay_1", "relay_2"], start, start + 900))
        book.started(shed_id, {"relay_1": True, "relay_2": True}, start)
        book.begin_restore(shed_id, "deadline", start + 900)
        book.finish(shed_id, ShedState.RESTORED, start + 900)
    book.add(Shed("live", "lm1", ["relay_3"], 1.9e9, 1.9e9 + 900))
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        store = ShedStore(Path(tmp) / "sheds.json", book.memory)
        saves = []
        for _ in range(20):  # a shed change with the finished part unchanged (its JSON is reused)
            started = time.perf_counter()
            store.save(book)
            saves.append(time.perf_counter() - started)
        size = store.path.stat().st_size
        started = time.perf_counter()
        store.load()
        load = time.perf_counter() - started
    print(f"sheds.json with {count} finished sheds: {size} bytes ({size / max(count, 1):.0f} B each); "
          f"save (write + 2 fsync) median {statistics.median(saves) * 1e3:.1f} ms, max {max(saves) * 1e3:.1f} ms; "
          f"load {load * 1e3:.1f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
