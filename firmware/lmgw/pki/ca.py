"""The LMGW certificate authority, kept in one directory.

``ca.key`` (0600) and ``ca.crt``, ``inventory.sqlite``, and the published
CRL as ``crl.der`` and ``crl.pem``.  Gateway identity is the certificate's
CN (the gateway ID, e.g. its serial number); the device keeps its key when it
sends a CSR, the factory may have the CA generate one.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..atomicfile import write_atomically
from .inventory import Inventory
from .operator import OPERATOR_EKU, OPERATOR_NAME, ROLE_POLICIES, Role

GATEWAY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
REASONS = {flag.value: flag for flag in x509.ReasonFlags if flag not in (x509.ReasonFlags.unspecified,)}
REASONS["unspecified"] = x509.ReasonFlags.unspecified
BACKDATE = timedelta(minutes=5)
"""Certificates start a little in the past: a device clock slightly behind still accepts them."""
OPERATIONAL_DAYS = 90
"""Default lifetime of an operational certificate (renewed over the channel, see docs/pki.md)."""
OPERATIONAL_POLICY = x509.ObjectIdentifier("2.25.160042937440618036355542430367717655431")
"""Certificate policy marking an operational (LDevID-like) gateway certificate; a gateway certificate
without it is a factory identity.  A UUID-derived OID (ITU-T X.667): no registration needed."""


class PkiError(ValueError):
    """A request the CA refuses; the message says why."""


@dataclass(frozen=True)
class Issued:
    common_name: str
    serial: int
    cert_pem: bytes
    key_pem: bytes | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def check_gateway_id(gateway_id: str) -> str:
    if not GATEWAY_ID.match(gateway_id):
        raise PkiError(f"gateway ID {gateway_id!r} must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
    return gateway_id


def reason_flag(reason: str) -> x509.ReasonFlags:
    try:
        return REASONS[reason]
    except KeyError:
        raise PkiError(f"unknown revocation reason {reason!r}; one of {', '.join(sorted(REASONS))}") from None


def load_csr(csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, str]:
    """A CSR the CA would sign, and the gateway ID it asks for; ``PkiError`` says why not."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise PkiError("CSR signature is invalid (the request was not made with the key it carries)")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PkiError("CSR subject must have exactly one CN, the gateway ID")
    gateway_id = check_gateway_id(str(names[0].value))
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise PkiError(f"CSR key curve {key.curve.name} not accepted (P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PkiError(f"CSR RSA key of {key.key_size} bits is too weak (2048 minimum)")
    else:
        raise PkiError(f"CSR key type {type(key).__name__} not accepted (ECDSA P-256/P-384 or RSA >= 2048)")
    return csr, gateway_id


def is_operational(certificate: x509.Certificate) -> bool:
    """True for an operational gateway certificate, False for a factory identity."""
    try:
        policies = certificate.extensions.get_extension_for_class(x509.CertificatePolicies).value
    except x509.ExtensionNotFound:
        return False
    return any(p.policy_identifier == OPERATIONAL_POLICY for p in policies)


class CertificateAuthority:
    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.directory = directory
        self.key = key
        self.cert = cert
        self.inventory = Inventory(directory / "inventory.sqlite")

    # -- create / open ----------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, name: str = "LMGW CA", days: int = 3650) -> CertificateAuthority:
        directory = Path(directory)
        if (directory / "ca.key").exists():
            raise PkiError(f"a CA already exists in {directory}; refusing to overwrite it")
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + timedelta(days=days))
            # pathLen 1: room for one intermediate, the cross-certificate of a successor CA, so that a gateway that
            # missed a CA rollover still verifies a DSO certificate of the new CA through it (docs/pki.md).
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_atomically(directory / "ca.key", _pem_key(key), mode=0o600)
        write_atomically(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(directory, key, cert)
        ca.publish_crl()
        return ca

    @classmethod
    def open(cls, directory: Path) -> CertificateAuthority:
        directory = Path(directory)
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        except FileNotFoundError:
            raise PkiError(f"no CA in {directory} (create one with `lmgw-pki --ca-dir {directory} init`)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory / 'ca.key'} is not an ECDSA key")
        return cls(directory, key, cert)

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    # -- issue --------------------------------------------------------------------

    def _issue(self, kind: str, common_name: str, public_key: Any, usage: list[x509.ObjectIdentifier],
               not_before: datetime, not_after: datetime, sans: list[x509.GeneralName] | None = None,
               replaces: int | None = None, policies: list[x509.ObjectIdentifier] | None = None) -> Issued:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if kind == "operational":
            policies = [OPERATIONAL_POLICY]
        if policies:
            builder = builder.add_extension(
                x509.CertificatePolicies([x509.PolicyInformation(oid, None) for oid in policies]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        pem = cert.public_bytes(serialization.Encoding.PEM)
        self.inventory.record(cert.serial_number, kind, common_name, not_before, not_after, pem, replaces)
        return Issued(common_name, cert.serial_number, pem)

    def _validity(self, days: int, not_before: datetime | None, not_after: datetime | None) -> tuple[datetime, datetime]:
        start = not_before or _now() - BACKDATE
        end = not_after or start + BACKDATE + timedelta(days=days)
        if end <= start:
            raise PkiError("certificate would end before it starts")
        return start, end

    def issue_server(self, common_name: str, dns_names: list[str], ip_addresses: list[str], days: int = 825) -> Issued:
        """The DSO's TLS server certificate (the gateway checks its host name against these SANs)."""
        try:
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        except ValueError as exc:
            raise PkiError(f"bad subject alternative name: {exc}") from None
        if not sans:
            raise PkiError("a server certificate needs at least one DNS name or IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = self._validity(days, None, None)
        issued = self._issue("server", common_name, key.public_key(), [ExtendedKeyUsageOID.SERVER_AUTH], start, end, sans)
        return Issued(issued.common_name, issued.serial, issued.cert_pem, _pem_key(key))

    def issue_gateway(self, gateway_id: str, days: int = 3650, *, not_before: datetime | None = None,
                      not_after: datetime | None = None) -> Issued:
        """Factory flow: generate the device key here and certify it."""
        check_gateway_id(gateway_id)
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = self._validity(days, not_before, not_after)
        issued = self._issue("gateway", gateway_id, key.public_key(), [ExtendedKeyUsageOID.CLIENT_AUTH], start, end)
        return Issued(issued.common_name, issued.serial, issued.cert_pem, _pem_key(key))

    def sign_csr(self, csr_pem: bytes, days: int = 3650, *, lifetime: timedelta | None = None,
                 operational: bool = False, replaces: int | None = None) -> Issued:
        """Device flow: the device keeps its key and sends a CSR whose CN is its gateway ID.

        ``operational``: a short-lived certificate renewed over the channel (kind ``operational``,
        marked with ``OPERATIONAL_POLICY``); ``replaces`` is the serial it supersedes (audit trail)."""
        _, gateway_id = load_csr(csr_pem)
        csr = x509.load_pem_x509_csr(csr_pem)
        if lifetime is not None:
            start = _now() - BACKDATE
            start, end = self._validity(0, start, start + BACKDATE + lifetime)
        else:
            start, end = self._validity(days, None, None)
        kind = "operational" if operational else "gateway"
        return self._issue(kind, gateway_id, csr.public_key(), [ExtendedKeyUsageOID.CLIENT_AUTH], start, end,
                           replaces=replaces)

    def issue_operator(self, name: str, role: Role, days: int = 365, not_after: datetime | None = None) -> Issued:
        """Key and certificate of a person or system using the DSO's operator API, with its role
        (``lmgw.pki.operator``): never accepted on the gateway endpoint, no gateway certificate accepted by the API."""
        if not OPERATOR_NAME.match(name):
            raise PkiError(f"operator name {name!r} must be 1 to 64 characters of A-Z a-z 0-9 space . _ @ + - "
                           "(starting with a letter or digit)")
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = self._validity(days, None, not_after)
        issued = self._issue("operator", name, key.public_key(), [ExtendedKeyUsageOID.CLIENT_AUTH, OPERATOR_EKU],
                             start, end, policies=[ROLE_POLICIES[role]])
        return Issued(issued.common_name, issued.serial, issued.cert_pem, _pem_key(key))

    def issue_update_signer(self, name: str, days: int = 1825) -> Issued:
        """Key and certificate that sign firmware bundles (RAUC): separate from every TLS key."""
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = self._validity(days, None, None)
        issued = self._issue("update-signer", name, key.public_key(), [ExtendedKeyUsageOID.CODE_SIGNING], start, end)
        return Issued(issued.common_name, issued.serial, issued.cert_pem, _pem_key(key))

    def cross_certify(self, successor: x509.Certificate) -> Issued:
        """CA rollover: certify the successor CA's name and key with this CA's key.  Gateways that trust this CA
        check the successor's root with it (``trust.update``) before they trust it."""
        not_after = min(self.cert.not_valid_after_utc, successor.not_valid_after_utc)
        start = _now() - BACKDATE
        cert = (
            x509.CertificateBuilder()
            .subject_name(successor.subject).issuer_name(self.cert.subject).public_key(successor.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(successor.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        name = successor.subject.rfc4514_string()
        self.inventory.record(cert.serial_number, "cross", name, start, not_after, pem)
        return Issued(name, cert.serial_number, pem)

    # -- revoke -------------------------------------------------------------------

    def revoke(self, *, gateway_id: str | None = None, serial: int | None = None, reason: str = "unspecified") -> list[int]:
        """Revoke every live certificate of a gateway, or one serial; publish a new CRL."""
        flag = reason_flag(reason)
        if (gateway_id is None) == (serial is None):
            raise PkiError("revoke needs either a gateway ID or a serial")
        rows = self.inventory.find(common_name=gateway_id) if gateway_id is not None else self.inventory.find(serial=serial)
        if not rows:
            raise PkiError(f"no certificate issued for {'gateway ' + gateway_id if gateway_id else f'serial {serial:x}'}")
        live = [row for row in rows if row["revoked_at"] is None]
        if not live:
            raise PkiError(f"{'gateway ' + gateway_id if gateway_id else f'serial {serial:x}'} is already revoked")
        now = _now()
        for row in live:
            self.inventory.revoke(int(row["serial"], 16), flag.value, now)
        self.publish_crl()
        return [int(row["serial"], 16) for row in live]

    def publish_crl(self, days: int = 7) -> x509.CertificateRevocationList:
        """Sign a CRL of every revoked certificate, valid ``days``, and write it atomically."""
        now = _now()
        number = self._next_crl_number()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject).last_update(now - BACKDATE).next_update(now + timedelta(days=days))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        for row in self.inventory.revoked():
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(row["serial"], 16))
                .revocation_date(datetime.fromisoformat(row["revoked_at"]))
            )
            if row["reason"] != "unspecified":
                entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags(row["reason"])), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(self.key, hashes.SHA256())
        write_atomically(self.directory / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
        write_atomically(self.directory / "crl.der", crl.public_bytes(serialization.Encoding.DER))
        write_atomically(self.directory / "crl.number", str(number).encode())
        return crl

    def _next_crl_number(self) -> int:
        try:
            return int((self.directory / "crl.number").read_text()) + 1
        except FileNotFoundError:
            return 1

    def expiring(self, within: timedelta) -> list[dict[str, Any]]:
        """Per gateway, the certificate it connects with (its newest live operational one, else its factory
        one) when it ends within ``within``, soonest first; a renewed gateway is not listed."""
        now = _now()
        latest: dict[str, dict[str, Any]] = {}
        rank = {"gateway": 0, "operational": 1}
        for row in self.inventory_rows():
            if row["kind"] not in rank or row["revoked_at"] is not None:
                continue
            held = latest.get(row["common_name"])
            if held is None or (rank[row["kind"]], row["not_after"]) > (rank[held["kind"]], held["not_after"]):
                latest[row["common_name"]] = row
        limit = (now + within).isoformat()
        return sorted((r for r in latest.values() if r["not_after"] <= limit), key=lambda r: str(r["not_after"]))

    def inventory_rows(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != "pem"} for row in self.inventory.find()]
