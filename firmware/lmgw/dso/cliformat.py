"""What ``lmgw-dso`` prints for people: tables, a job's progress bar and its summary (pure text, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

BAR_WIDTH = 30
MAX_CELL = 40
MAX_ERRORS_SHOWN = 20


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned on the widest cell (cells cut at ``MAX_CELL`` characters)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def when(iso: str | None) -> str:
    """An ISO time as ``2026-12-02 08:00:01Z`` (UTC), or "-"."""
    if not iso:
        return "-"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return moment.strftime("%Y-%m-%d %H:%M:%S") + ("Z" if moment.utcoffset() is not None else "")


def gateways_table(gateways: Sequence[dict[str, Any]]) -> str:
    rows = []
    for g in gateways:
        certificate = g.get("certificate") or {}
        tags = ",".join(f"{k}={v}" for k, v in sorted((g.get("tags") or {}).items()))
        rows.append([g["gateway_id"], "online" if g.get("online") else "offline", g.get("node"),
                     g.get("firmware_version"), when(g.get("last_seen")), when(certificate.get("not_after")), tags])
    return table(["GATEWAY", "STATUS", "NODE", "FIRMWARE", "LAST SEEN", "CERTIFICATE ENDS", "TAGS"], rows)


def progress_line(job: dict[str, Any]) -> str:
    """``[#######.......] 140/200  done 130  error 1  offline 9  (running)``"""
    total, finished = int(job["total"]), int(job["finished"])
    filled = BAR_WIDTH * finished // total if total else BAR_WIDTH
    counts = "  ".join(f"{name} {n}" for name, n in job["counts"].items()
                       if n and name not in ("pending", "sent"))
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {finished}/{total}  {counts}  ({job['state']})".rstrip()


def job_summary(job: dict[str, Any]) -> str:
    """The end of ``job start``/``job show``: the job, one row per outcome, the shed load, the first errors."""
    lines = [f"job {job['id']}: {job['method']} to {job['total']} gateway(s), {job['state']}"
             f" (node {job.get('node') or '-'}, started {when(_iso(job.get('created_at')))},"
             f" ended {when(_iso(job.get('ended_at')))})"]
    rows = [[name, n] for name, n in job["counts"].items() if n or name in ("done", "error", "offline", "timed_out")]
    lines.append(table(["OUTCOME", "GATEWAYS"], rows))
    if job.get("shed_load_w") is not None:
        lines.append(f"load shed: {job['shed_load_w'] / 1000:.1f} kW (the profiles' shed_load of the gateways done)")
    failed = [o for o in job.get("outcomes", []) if o["outcome"] not in ("done", "cancelled")]
    if failed:
        lines.append(table(["GATEWAY", "OUTCOME", "CODE", "MESSAGE"],
                           [[o["gateway_id"], o["outcome"], o["code"], o["message"]] for o in failed[:MAX_ERRORS_SHOWN]]))
        if len(failed) > MAX_ERRORS_SHOWN:
            lines.append(f"... and {len(failed) - MAX_ERRORS_SHOWN} more (lmgw-dso job show {job['id']} --json)")
    return "\n".join(lines)


def jobs_table(jobs: Sequence[dict[str, Any]]) -> str:
    return table(["JOB", "METHOD", "STATE", "DONE/TOTAL", "NODE", "STARTED", "BY"],
                 [[j["id"], j["method"], j["state"], f"{j['counts']['done']}/{j['total']}", j.get("node"),
                   when(_iso(j.get("created_at"))), j.get("created_by")] for j in jobs])


def _iso(seconds: float | None) -> str | None:
    from datetime import timezone

    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat()
