"""``lmgw-dso``: run a DSO node, or be its operator through the operator HTTP API of any node.

    lmgw-dso --config dso.toml serve
    lmgw-dso gateways                                  # a table; --json for scripts; --status/--tag/--firmware
    lmgw-dso call GW-0001 lm.read '{"lm": "lm-1", "points": ["total_power"]}'
    lmgw-dso update GW-0001 lmgw-1.2.0.raucb --version 1.2.0 --reboot-at 2026-11-25T02:00:00+00:00
    lmgw-dso events GW-0001 --kind 'security.*'        # stored events; --follow: the live feed
    lmgw-dso revoke GW-0001 --reason keyCompromise
    lmgw-dso tag GW-0001 region=north feeder=F12       # key= removes a tag; no pairs: show them
    lmgw-dso job start load.shed '{"lm": "lm1", "points": ["relay_1"], "duration_s": 900}' --tag region=north --window 300
    lmgw-dso job show JOB --outcome error               # job list, job cancel JOB
    lmgw-dso expiring --days 30                        # gateways whose certificate ends within 30 days
    lmgw-dso trust-update GW-0001 --anchor ca2/ca.crt --proof ca2/cross.crt --crl ca2/crl.der   # CA rollover
    lmgw-dso trust-retire GW-0001 --anchor ca1/ca.crt

Which node and which operator certificate: --url/--ca/--cert/--key, or an [operator] table (url,
ca_file, cert_file, key_file) in --operator FILE or in the --config file itself (lmgw/dso/client.py).
Exit status: 0 done, 1 the node or the gateway refused (the error's code and message on stderr),
2 a usage, configuration or connection problem.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from .. import strictjson
from ..config import ConfigError
from ..logsetup import configure
from . import cliformat
from .client import ApiClient, ApiFailure, ClientConfig, Unreachable

if TYPE_CHECKING:  # the node's modules are imported by `serve` only: an operator command starts faster
    from .config import DsoConfig
    from .server import DsoServer

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("dso.toml")
JOB_POLL = 0.5
"""Seconds between two progress reads of a job the CLI waits for."""
PROGRESS_EVERY = 5.0
"""Seconds between two progress lines when stderr is not a terminal (a log, CI)."""


class UsageError(Exception):
    """Bad arguments, found after parsing (exit status 2)."""


async def _start_operator_api(server: DsoServer, config: DsoConfig) -> Any:
    """The operator API: HTTPS (``[api]``, docs/operator-api.md) and the local socket (``[api] socket``), one
    application.  Gateways come first: an API that cannot start is one error line, the node goes on serving them."""
    try:
        from .http.service import OperatorApi
    except ImportError as exc:
        log.error("operator API not started: %s (install the head-end extra: pip install 'lmgw[dso]')", exc)
        return None
    assert config.http is not None
    api = OperatorApi(server, config.http, local_socket=config.api_socket, tcp=config.http.enabled)
    await api.start()  # its local socket's "operator API on" line comes last: the node is up (tests wait for it)
    return api


async def _serve(config: DsoConfig) -> None:
    from .server import DsoServer

    server = DsoServer(config)
    await server.start()
    api = await _start_operator_api(server, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if api is not None:
        await api.stop()
    await server.stop()


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = strictjson.loads(text, finite=True)
    except ValueError as exc:
        raise UsageError(f"{what} are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object")
    return value


def _selector_query(args: argparse.Namespace) -> list[tuple[str, str]]:
    query = [("tag", t) for t in args.tag or []]
    if getattr(args, "status", None):
        query.append(("status", args.status))
    if getattr(args, "firmware", None):
        query.append(("firmware", args.firmware))
    return query


def _out(args: argparse.Namespace, value: Any, text: str | None = None) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False) if text is None or args.json else text)


# -- commands (each returns the exit status) ----------------------------------------------------


async def _gateways(api: ApiClient, args: argparse.Namespace) -> int:
    answer = await api.get("/api/v1/gateways", _selector_query(args))
    summary = f"{answer['count']} gateway(s): {answer['online']} online, {answer['offline']} offline"
    _out(args, answer["gateways"], cliformat.gateways_table(answer["gateways"]) + "\n" + summary)
    return 0


async def _expiring(api: ApiClient, args: argparse.Namespace) -> int:
    answer = await api.get("/api/v1/gateways", [("expires_within_days", f"{args.days:g}")])
    _out(args, answer["gateways"], cliformat.gateways_table(answer["gateways"]))
    return 0


async def _call(api: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"method": args.method, "params": _json_object(args.params, "params")}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    return await _result(api, f"/api/v1/gateways/{args.gateway}/call", body)


async def _result(api: ApiClient, path: str, body: dict[str, Any]) -> int:
    """POST, then print the gateway's answer (``result``) as JSON."""
    answer = await api.post(path, body)
    print(json.dumps(answer["result"], indent=2, ensure_ascii=False))
    return 0


async def _trust(api: ApiClient, args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from .rollover import trust_update_params

    try:
        if args.command == "trust-update":
            method, params = "trust.update", trust_update_params(args.anchor, args.proof, args.crl, args.crl_url)
        else:
            anchor = x509.load_pem_x509_certificate(args.anchor.read_bytes())
            method, params = "trust.retire", {"sha256": anchor.fingerprint(hashes.SHA256()).hex()}
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return await _result(api, f"/api/v1/gateways/{args.gateway}/call", {"method": method, "params": params})


async def _update(api: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"bundle": args.bundle, "version": args.version, "allow_downgrade": args.allow_downgrade}
    if args.reboot_at is not None:
        body["reboot_at"] = args.reboot_at
    if args.commit_timeout is not None:
        body["commit_timeout"] = args.commit_timeout
    return await _result(api, f"/api/v1/gateways/{args.gateway}/update", body)


async def _revoke(api: ApiClient, args: argparse.Namespace) -> int:
    answer = await api.post(f"/api/v1/gateways/{args.gateway}/revoke", {"reason": args.reason})
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return 0


def _event_line(record: dict[str, Any]) -> str:
    event = record.get("event", {})
    details = json.dumps(event.get("details", {}), ensure_ascii=False, separators=(",", ":"))
    return f"{cliformat.when(record.get('received'))}  {record.get('gateway_id')}  {event.get('kind')}  {details}"


async def _events(api: ApiClient, args: argparse.Namespace) -> int:
    query = [("kind", args.kind)] if args.kind else []
    if args.follow:
        if args.gateway:
            query.append(("gateway", args.gateway))
        async for name, data in api.events("/api/v1/events/stream", query):
            if name == "gateway-event" and isinstance(data, dict):
                print(json.dumps(data, ensure_ascii=False) if args.json else _event_line(data), flush=True)
            elif name in ("closed", "overflow"):
                print(f"lmgw-dso: the node ended the live feed ({name})", file=sys.stderr)
                return 1
        return 0
    if args.since:
        query.append(("since", args.since))
    path = f"/api/v1/gateways/{args.gateway}/events" if args.gateway else "/api/v1/events"
    answer = await api.get(path, query)
    _out(args, answer["events"], "\n".join(_event_line(r) for r in answer["events"]) or "(no events)")
    return 0


async def _tag(api: ApiClient, args: argparse.Namespace) -> int:
    path = f"/api/v1/gateways/{args.gateway}/tags"
    if not args.pairs:
        answer = await api.get(path)
    else:
        patch: dict[str, str | None] = {}
        for pair in args.pairs:
            key, equals, value = pair.partition("=")
            if not equals:
                raise UsageError(f"tag {pair!r} must be key=value (key= removes the tag)")
            patch[key] = value or None
        answer = await api.request("PATCH", path, {"tags": patch})
    text = " ".join(f"{k}={v}" for k, v in sorted(answer["tags"].items())) or "(no tags)"
    _out(args, answer, f"{answer['gateway_id']}: {text}")
    return 0


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    chosen = [bool(args.ids), bool(args.tag), args.all]
    if sum(chosen) != 1:
        raise UsageError("choose the gateways with exactly one of --ids A,B,..., --tag key=value (repeatable) or --all")
    if args.ids:
        return {"ids": [i for i in args.ids.split(",") if i]}
    if args.tag:
        tags = {}
        for pair in args.tag:
            key, equals, value = pair.partition("=")
            if not equals or not value:
                raise UsageError(f"--tag {pair!r} must be key=value")
            tags[key] = value
        return {"tags": tags}
    return {"all": True}


async def _job(api: ApiClient, args: argparse.Namespace) -> int:
    if args.job_command == "list":
        answer = await api.get("/api/v1/jobs", [("state", "running")] if args.running else [])
        _out(args, answer["jobs"], cliformat.jobs_table(answer["jobs"]) if answer["jobs"] else "(no jobs)")
        return 0
    if args.job_command == "start":
        body: dict[str, Any] = {"method": args.method, "params": _json_object(args.params, "params"),
                                "selection": _selection(args), "concurrency": args.concurrency}
        if args.window:
            body["window_s"] = args.window
        if args.timeout is not None:
            body["timeout"] = args.timeout
        job = await api.post("/api/v1/jobs", body)
        print(f"job {job['id']} started on node {job.get('node') or '-'}: {job['method']} to {job['total']} "
              f"gateway(s)", file=sys.stderr)
        if args.no_wait:
            _out(args, job, job["id"])
            return 0
        return await _follow(api, job["id"], args)
    if args.job_command == "cancel":
        job = await api.post(f"/api/v1/jobs/{args.job}/cancel")
        _out(args, job, f"job {job['id']}: {job['state']} ({job['finished']}/{job['total']} finished)")
        return 0
    if args.follow:
        return await _follow(api, args.job, args)
    job = await api.get(f"/api/v1/jobs/{args.job}", [("outcome", args.outcome)])
    _out(args, job, cliformat.job_summary(job))
    return 0


async def _follow(api: ApiClient, job_id: str, args: argparse.Namespace) -> int:
    """A progress bar until the job ends (a line every few seconds when stderr is not a terminal), then its summary."""
    terminal = sys.stderr.isatty()
    loop = asyncio.get_running_loop()
    last_line, last_time = "", 0.0
    while True:
        job = await api.get(f"/api/v1/jobs/{job_id}")
        line = cliformat.progress_line(job)
        final = job["state"] in ("done", "cancelled")
        if terminal:
            print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
        elif line != last_line and (final or loop.time() - last_time >= PROGRESS_EVERY):
            print(line, file=sys.stderr, flush=True)
            last_line, last_time = line, loop.time()
        if final:
            break
        await asyncio.sleep(JOB_POLL)
    job = await api.get(f"/api/v1/jobs/{job_id}", [("outcome", "all")])
    _out(args, job, cliformat.job_summary(job))
    return 0 if job["state"] == "done" and job["counts"]["done"] == job["total"] else 1


COMMANDS = {"gateways": _gateways, "expiring": _expiring, "call": _call, "trust-update": _trust,
            "trust-retire": _trust, "update": _update, "revoke": _revoke, "events": _events, "tag": _tag,
            "job": _job}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmgw-dso", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="the node's configuration (TOML; default dso.toml): serve "
                                                    "runs it, the other commands reach its [api] by default")
    parser.add_argument("--operator", type=Path, help="operator client settings: an [operator] table (TOML)")
    parser.add_argument("--url", help="a node's operator API, https://host:port")
    parser.add_argument("--ca", type=Path, help="CA file verifying the node's API certificate")
    parser.add_argument("--cert", type=Path, help="operator certificate (lmgw-pki operator-cert)")
    parser.add_argument("--key", type=Path, help="its private key")
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the DSO node (gateway endpoint and operator API)")
    gateways = commands.add_parser("gateways", help="the fleet as a table: status, node, firmware, last seen")
    gateways.add_argument("--status", choices=("online", "offline"))
    gateways.add_argument("--tag", action="append", help="key=value (repeatable: all must match)")
    gateways.add_argument("--firmware", help="exact firmware version")
    call = commands.add_parser("call", help="call a method on a gateway and print its answer")
    call.add_argument("gateway")
    call.add_argument("method")
    call.add_argument("params", nargs="?", default="{}", help="JSON object")
    call.add_argument("--timeout", type=float)
    update = commands.add_parser("update", help="offer a gateway a firmware bundle from the node's [updates] bundles_dir")
    update.add_argument("gateway")
    update.add_argument("bundle", help="file name in bundles_dir")
    update.add_argument("--version", required=True, help="the bundle's firmware version")
    update.add_argument("--reboot-at", help="ISO 8601 time with zone; default: reboot right after installing")
    update.add_argument("--allow-downgrade", action="store_true")
    update.add_argument("--commit-timeout", type=int, help="seconds the new firmware has to reach the DSO (default 600)")
    revoke = commands.add_parser("revoke", help="revoke a gateway's certificates and disconnect it")
    revoke.add_argument("gateway")
    revoke.add_argument("--reason", default="unspecified")
    trust = commands.add_parser("trust-update", help="CA rollover: make a gateway trust the successor CA")
    trust.add_argument("gateway")
    trust.add_argument("--anchor", type=Path, required=True, help="the successor CA's ca.crt")
    trust.add_argument("--proof", type=Path, required=True, help="its cross.crt, signed by the CA the gateway trusts")
    trust.add_argument("--crl", type=Path, required=True, help="the successor CA's current crl.der")
    trust.add_argument("--crl-url", help="where the gateway refreshes that CRL")
    retire = commands.add_parser("trust-retire", help="CA rollover: a gateway stops trusting the old CA")
    retire.add_argument("gateway")
    retire.add_argument("--anchor", type=Path, required=True, help="the old CA's ca.crt")
    expiring = commands.add_parser("expiring", help="gateways whose certificate ends within --days")
    expiring.add_argument("--days", type=float, default=30)
    events = commands.add_parser("events", help="events reported by gateways (stored, or --follow the live feed)")
    events.add_argument("gateway", nargs="?")
    events.add_argument("--kind", help="exact kind, or a prefix ending in * (security.*)")
    events.add_argument("--since", help="ISO 8601 time with zone")
    events.add_argument("--follow", action="store_true", help="print new events as they arrive, until Ctrl-C")
    tag = commands.add_parser("tag", help="show or set a gateway's tags (region, feeder, customer_class, ...)")
    tag.add_argument("gateway")
    tag.add_argument("pairs", nargs="*", help="key=value sets a tag, key= removes it")
    job = commands.add_parser("job", help="fleet jobs: one method sent to many gateways")
    jobs = job.add_subparsers(dest="job_command", required=True)
    start = jobs.add_parser("start", help="start a job and follow it to the end (progress bar, then a summary)")
    start.add_argument("method", choices=("load.shed", "load.restore", "gw.update"))
    start.add_argument("params", help="JSON object (gw.update: bundle and version, as the update command)")
    start.add_argument("--ids", help="gateway IDs, comma-separated")
    start.add_argument("--tag", action="append", help="key=value (repeatable: all must match)")
    start.add_argument("--all", action="store_true", help="every gateway the head-end knows")
    start.add_argument("--window", type=float, default=0.0, help="load.shed: seconds over which starts are spread")
    start.add_argument("--concurrency", type=int, default=50, help="gateways called at once")
    start.add_argument("--timeout", type=float, help="seconds each gateway has to answer")
    start.add_argument("--no-wait", action="store_true", help="print the job's ID and return")
    show = jobs.add_parser("show", help="a job's progress and outcomes")
    show.add_argument("job")
    show.add_argument("--outcome", default="all", help="list only gateways with this outcome (error, offline, ...)")
    show.add_argument("--follow", action="store_true", help="progress bar until it ends")
    cancel = jobs.add_parser("cancel", help="send nothing more; calls in flight finish")
    cancel.add_argument("job")
    listing = jobs.add_parser("list", help="jobs, newest first (the newest 100)")
    listing.add_argument("--running", action="store_true", help="only the jobs not ended yet")
    return parser


async def _operate(config: ClientConfig, args: argparse.Namespace) -> int:
    async with ApiClient(config) as api:
        return await COMMANDS[args.command](api, args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure(args.verbose)
    config_file = args.config or DEFAULT_CONFIG
    if args.command == "serve":
        from .cluster.config import loop_factory
        from .config import DsoConfig

        try:
            config = DsoConfig.load(config_file)
            with asyncio.Runner(loop_factory=loop_factory(config.cluster)) as runner:  # uvloop: docs/fleet.md
                runner.run(_serve(config))
        except ConfigError as exc:  # e.g. lmgw.tls.TlsPolicyError
            print(f"lmgw-dso: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        dso_file = config_file if args.config is not None or DEFAULT_CONFIG.exists() else None
        client = ClientConfig.resolve(operator_file=args.operator, dso_file=dso_file, url=args.url, ca_file=args.ca,
                                      cert_file=args.cert, key_file=args.key)
        return asyncio.run(_operate(client, args))
    except (ConfigError, UsageError) as exc:
        print(f"lmgw-dso: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"lmgw-dso: {exc} (is `lmgw-dso serve` running with [api] enabled?)", file=sys.stderr)
        return 2
    except ApiFailure as exc:
        code = f" ({exc.code})" if exc.code is not None else ""
        print(f"error{code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
