"""``lmgw-pki``: run the LMGW certificate authority.

    lmgw-pki --ca-dir /srv/lmgw-ca init --name "ACME DSO LMGW CA"
    lmgw-pki server-cert --cn dso --dns dso.example.net --out-key dso.key --out-cert dso.crt
    lmgw-pki gateway-cert --id GW-0001 --out-dir ./GW-0001        # factory: key made here
    lmgw-pki sign-csr --csr gw.csr --out gw.crt                  # device keeps its key
    lmgw-pki revoke --id GW-0001 --reason keyCompromise
    lmgw-pki crl --days 7
    lmgw-pki list [--json]                                       # with which certificate replaced which
    lmgw-pki expiring --days 30                                  # gateways whose certificates end soon
    lmgw-pki rollover --new-dir /srv/lmgw-ca-2 --name "ACME DSO LMGW CA 2"   # successor CA + cross.crt
    lmgw-pki serve --host 0.0.0.0 --port 8080                    # CRL and OCSP over HTTP
    lmgw-pki operator-cert --name alice --role operator --out-key alice.key --out-cert alice.crt   # operator API
    lmgw-pki update-signer --name "LMGW update signing" --out-key u.key --out-cert u.crt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from ..atomicfile import write_atomically
from ..logsetup import configure
from .ca import OPERATIONAL_DAYS, REASONS, CertificateAuthority, Issued, PkiError
from .http import PkiHttpServer
from .operator import Role


def _write_pair(issued: Issued, key_path: Path, cert_path: Path) -> None:
    assert issued.key_pem is not None
    write_atomically(key_path, issued.key_pem, mode=0o600)
    write_atomically(cert_path, issued.cert_pem)


def _serial(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"serial must be hexadecimal, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmgw-pki", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ca-dir", type=Path, default=Path(os.environ.get("LMGW_CA_DIR", "lmgw-ca")),
                   help="CA directory (default: $LMGW_CA_DIR or ./lmgw-ca)")
    c = p.add_subparsers(dest="command", required=True)
    init = c.add_parser("init", help="create the CA (ECDSA P-256)")
    init.add_argument("--name", default="LMGW CA")
    init.add_argument("--days", type=int, default=3650)
    server = c.add_parser("server-cert", help="issue the DSO server certificate")
    server.add_argument("--cn", default="dso")
    server.add_argument("--dns", action="append", default=[])
    server.add_argument("--ip", action="append", default=[])
    server.add_argument("--days", type=int, default=825)
    server.add_argument("--out-key", type=Path, required=True)
    server.add_argument("--out-cert", type=Path, required=True)
    gateway = c.add_parser("gateway-cert", help="factory: generate a gateway key and certificate")
    gateway.add_argument("--id", required=True, help="gateway ID (certificate CN), e.g. the serial number")
    gateway.add_argument("--days", type=int, default=3650)
    gateway.add_argument("--out-dir", type=Path, required=True, help="receives device.key, device.crt, ca.crt")
    csr = c.add_parser("sign-csr", help="certify a gateway's CSR (the device keeps its key)")
    csr.add_argument("--csr", type=Path, required=True)
    csr.add_argument("--days", type=int, default=3650)
    csr.add_argument("--out", type=Path, required=True)
    csr.add_argument("--operational", action="store_true",
                     help=f"an operational certificate (default lifetime {OPERATIONAL_DAYS} days unless --days)")
    revoke = c.add_parser("revoke", help="revoke a gateway (all its certificates) or one serial; publishes the CRL")
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--id")
    who.add_argument("--serial", type=_serial, help="hexadecimal")
    revoke.add_argument("--reason", default="unspecified", choices=sorted(REASONS))
    crl = c.add_parser("crl", help="publish a fresh CRL (run it well before nextUpdate, e.g. daily)")
    crl.add_argument("--days", type=int, default=7)
    listing = c.add_parser("list", help="inventory of issued and revoked certificates")
    listing.add_argument("--json", action="store_true")
    rollover = c.add_parser("rollover", help="create the successor CA in --new-dir and cross-certify it (cross.crt)")
    rollover.add_argument("--new-dir", type=Path, required=True)
    rollover.add_argument("--name", required=True, help="the successor CA's name (different from this CA's)")
    rollover.add_argument("--days", type=int, default=3650)
    expiring = c.add_parser("expiring", help="gateways whose newest live certificate ends within --days")
    expiring.add_argument("--days", type=float, default=30)
    expiring.add_argument("--json", action="store_true")
    serve = c.add_parser("serve", help="serve the CRL and OCSP over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    operator = c.add_parser("operator-cert", help="key and certificate for the DSO's operator API, with a role")
    operator.add_argument("--name", required=True, help="who: a person or system (the certificate CN)")
    operator.add_argument("--role", required=True, choices=[role.value for role in Role],
                          help="read-only: lists, status, events, metrics; operator: also calls, revoke, updates, tags")
    operator.add_argument("--days", type=int, default=365)
    operator.add_argument("--out-key", type=Path, required=True)
    operator.add_argument("--out-cert", type=Path, required=True)
    signer = c.add_parser("update-signer", help="key and certificate that sign firmware bundles")
    signer.add_argument("--name", default="LMGW update signing")
    signer.add_argument("--days", type=int, default=1825)
    signer.add_argument("--out-key", type=Path, required=True)
    signer.add_argument("--out-cert", type=Path, required=True)
    return p


def run(args: argparse.Namespace) -> None:
    if args.command == "init":
        ca = CertificateAuthority.create(args.ca_dir, name=args.name, days=args.days)
        print(f"created CA {ca.cert.subject.rfc4514_string()} in {args.ca_dir}")
        return
    ca = CertificateAuthority.open(args.ca_dir)
    if args.command == "server-cert":
        issued = ca.issue_server(args.cn, args.dns, args.ip, days=args.days)
        _write_pair(issued, args.out_key, args.out_cert)
        print(f"issued server certificate {issued.serial:x} for {', '.join(args.dns + args.ip)}")
    elif args.command == "gateway-cert":
        issued = ca.issue_gateway(args.id, days=args.days)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        _write_pair(issued, args.out_dir / "device.key", args.out_dir / "device.crt")
        write_atomically(args.out_dir / "ca.crt", ca.cert_pem)
        print(f"issued gateway certificate {issued.serial:x} for {args.id} in {args.out_dir}")
    elif args.command == "sign-csr":
        try:
            csr = args.csr.read_bytes()
        except OSError as exc:
            raise PkiError(f"cannot read {args.csr}: {exc.strerror}") from None
        days = OPERATIONAL_DAYS if args.operational and args.days == 3650 else args.days
        issued = ca.sign_csr(csr, days=days, operational=args.operational)
        write_atomically(args.out, issued.cert_pem)
        print(f"issued gateway certificate {issued.serial:x} for {issued.common_name}")
    elif args.command == "revoke":
        serials = ca.revoke(gateway_id=args.id, serial=args.serial, reason=args.reason)
        print(f"revoked {', '.join(f'{s:x}' for s in serials)} ({args.reason}); CRL published")
    elif args.command == "crl":
        crl = ca.publish_crl(days=args.days)
        print(f"CRL published, next update {crl.next_update_utc.isoformat() if crl.next_update_utc else 'never'}")
    elif args.command == "list":
        rows = ca.inventory_rows()
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in [] if args.json else rows:
            state = f"REVOKED {row['revoked_at'][:19]} {row['reason']}" if row["revoked_at"] else "valid"
            replaced = f"  replaces {row['replaces']}" if row.get("replaces") else ""
            print(f"{row['serial']:<42} {row['kind']:<14} {row['common_name']:<24} until {row['not_after'][:10]}  "
                  f"{state}{replaced}")
    elif args.command == "rollover":
        if x509.Name.from_rfc4514_string(f"CN={args.name}") == ca.cert.subject:
            raise PkiError("the successor CA needs a name of its own: gateways tell the CAs apart by name and key")
        successor = CertificateAuthority.create(args.new_dir, name=args.name, days=args.days)
        cross = ca.cross_certify(successor.cert)
        write_atomically(args.new_dir / "cross.crt", cross.cert_pem)
        print(f"created CA {successor.cert.subject.rfc4514_string()} in {args.new_dir}; "
              f"cross-certificate {cross.serial:x} by {ca.cert.subject.rfc4514_string()} in {args.new_dir / 'cross.crt'}")
    elif args.command == "expiring":
        soon = ca.expiring(timedelta(days=args.days))
        if args.json:
            print(json.dumps(soon, indent=2))
        for row in [] if args.json else soon:
            print(f"{row['common_name']:<24} {row['kind']:<12} serial {row['serial']} ends {row['not_after'][:19]}")
    elif args.command == "serve":
        server = PkiHttpServer(ca, args.host, args.port)
        print(f"serving {server.url}/crl.der, /crl.pem and /ocsp", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    elif args.command == "operator-cert":
        issued = ca.issue_operator(args.name, Role(args.role), days=args.days)
        _write_pair(issued, args.out_key, args.out_cert)
        print(f"issued operator certificate {issued.serial:x} for {args.name} (role {args.role})")
    elif args.command == "update-signer":
        issued = ca.issue_update_signer(args.name, days=args.days)
        _write_pair(issued, args.out_key, args.out_cert)
        print(f"issued update-signing certificate {issued.serial:x}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure()
    try:
        run(args)
    except PkiError as exc:
        print(f"lmgw-pki: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lmgw-pki: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
