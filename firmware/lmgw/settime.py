"""``python -m lmgw.settime``: the minimal privileged helper that sets the system clock from a DSO time statement.

    python -m lmgw.settime REQUEST --anchors BUNDLE --state STATE [--crl CRL]... [--dry-run]

It is the only part that needs ``CAP_SYS_TIME`` and it trusts nothing the
agent says: it reads the request the agent wrote (the DSO's answer, the
nonce the agent made, and the CA roots that ``trust.update`` added, each with
its cross-certificate), verifies the statement again against the trusted CA
bundle plus those roots whose proof it checked itself from that bundle (a
CA rollover), the CRLs and its own floor (build date, and the last time it
set, kept in STATE), and only then sets the clock.  A compromised agent can at
most replay a statement that is still later than that floor, never move the
clock back.  ``--dry-run`` does every check and prints the time instead of
setting it (tests; an operator checking a statement by hand).  Exit codes: 0
set (or would set), 2 refused, with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509

from .atomicfile import write_atomically
from .clock import BUILD_DATE_FILE, build_date
from .gateway.anchors import proven_anchors
from .revocation import RevocationError, load_crl
from .timestatement import TimeRefused, verify_statement

EPOCH = datetime.fromtimestamp(0, timezone.utc)


def last_good(state: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(json.loads(state.read_text())["last_good"]), timezone.utc)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_last_good(state: Path, when: datetime) -> None:
    write_atomically(state, json.dumps({"last_good": when.timestamp()}).encode())


def floor(state: Path, build_date_file: Path = BUILD_DATE_FILE) -> datetime:
    """The time a statement must be later than: the build date and the last time known good."""
    return max([t for t in (build_date(build_date_file), last_good(state)) if t is not None], default=EPOCH)


def revoked_by(crl_files: list[Path], anchors: list[x509.Certificate]) -> set[int]:
    """Serials revoked by any of these CRLs (their dates set aside: the clock is what is in question)."""
    serials: set[int] = set()
    for file in crl_files:
        for anchor in anchors:
            try:
                crl = load_crl(file.read_bytes(), anchor)
            except (OSError, RevocationError):
                continue
            serials |= {entry.serial_number for entry in crl}
    return serials


def offered_anchors(request: Any) -> list[tuple[bytes, bytes]]:
    """The (anchor, proof) pairs the agent passed along; anything else in that list is ignored."""
    offered = request.get("anchors", []) if isinstance(request, dict) else []
    return [(e["anchor"].encode(), e["proof"].encode()) for e in offered if isinstance(e, dict)
            and isinstance(e.get("anchor"), str) and isinstance(e.get("proof"), str)] if isinstance(offered, list) else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmgw.settime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("request", type=Path, help='JSON: {"nonce": ..., "answer": {...}} written by the agent')
    parser.add_argument("--anchors", type=Path, required=True, help="PEM bundle of the trusted CAs")
    parser.add_argument("--state", type=Path, required=True, help="where the last time set is kept")
    parser.add_argument("--crl", type=Path, action="append", default=[])
    parser.add_argument("--build-date-file", type=Path, default=BUILD_DATE_FILE)
    parser.add_argument("--dry-run", action="store_true", help="check, print the time, do not set it")
    args = parser.parse_args(argv)
    try:
        request = json.loads(args.request.read_text())
        anchors = x509.load_pem_x509_certificates(args.anchors.read_bytes())
        anchors += proven_anchors(offered_anchors(request), anchors)
        revoked = revoked_by(args.crl, anchors)
        when = verify_statement(request["answer"], str(request["nonce"]), anchors,
                                floor(args.state, args.build_date_file), revoked.__contains__)
        if not args.dry_run:
            time.clock_settime(time.CLOCK_REALTIME, when.timestamp())
            save_last_good(args.state, when)
    except (OSError, ValueError, KeyError, TypeError, TimeRefused) as exc:
        print(f"lmgw.settime: clock not set: {exc}", file=sys.stderr)
        return 2
    print(f"{'would set' if args.dry_run else 'set'} clock to {when.isoformat()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
