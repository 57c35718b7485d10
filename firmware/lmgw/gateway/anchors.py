"""The CAs the gateway trusts, and how a new one is introduced (CA rollover).

The factory CA bundle (``[dso] ca_file`` on the identity partition) is the
first anchor.  The DSO introduces a new root with ``trust.update``: the new
root plus a proof the gateway can check with what it already trusts, a
cross-certificate (the new root's name and key, certified by a trusted CA's
key), and the new CA's current CRL.  An anchor without a valid proof is
refused and reported (``security.trust_anchor_refused``).  Accepted anchors
live on the data partition (``<data_dir>/trust/``: ``anchors.pem``, their
proofs ``proofs.pem``, the CRL of each, ``retired.json``); during the overlap
every anchor is trusted, and
a DSO certificate is checked against the CRL of the CA that issued it.
``trust.retire`` removes an anchor once the fleet moved on; the last anchor
cannot be retired.  The proofs are kept for the clock helper (``lmgw.settime``),
which trusts nothing the agent says: the agent hands it each anchor with its
proof, and the helper checks the proof again from the factory CA.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ..atomicfile import write_atomically
from ..revocation import CrlCache, RevocationError
from ..tls import signed_by

log = logging.getLogger(__name__)

UPDATED = "trust.updated"
REFUSED = "security.trust_anchor_refused"


class AnchorRefused(ValueError):
    """A proposed trust anchor (or retirement) is refused; the message says why."""


def fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def _spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def _certifies(proof: x509.Certificate, anchor: x509.Certificate) -> bool:
    """``proof`` carries ``anchor``'s name and key (a cross-certificate of it, whoever signed it)."""
    return proof.subject == anchor.subject and _spki(proof) == _spki(anchor)


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def verify_anchor(anchor_pem: bytes, proof_pem: bytes, trusted: list[x509.Certificate],
                  now: datetime | None) -> x509.Certificate:
    """The new root, if ``proof`` (a cross-certificate) shows that a trusted CA's key vouches for its name and key.
    ``now`` None sets the validity periods aside (the clock helper: the clock is what is in question)."""
    try:
        anchor = x509.load_pem_x509_certificate(anchor_pem)
        proof = x509.load_pem_x509_certificate(proof_pem)
    except ValueError as exc:
        raise AnchorRefused(f"not a PEM certificate: {exc}") from None
    if not _is_ca(anchor) or not signed_by(anchor, anchor):
        raise AnchorRefused("the anchor is not a self-signed CA certificate")
    if now is not None and not anchor.not_valid_before_utc <= now < anchor.not_valid_after_utc:
        raise AnchorRefused(f"the anchor is not valid now (valid {anchor.not_valid_before_utc.isoformat()} to "
                            f"{anchor.not_valid_after_utc.isoformat()})")
    if not _certifies(proof, anchor) or not _is_ca(proof):
        raise AnchorRefused("the proof does not certify the anchor's name and key as a CA")
    vouching = [ca for ca in trusted if signed_by(proof, ca)]
    if not vouching:
        raise AnchorRefused(f"the proof is not signed by a trusted CA (issuer {proof.issuer.rfc4514_string()})")
    if now is not None and not proof.not_valid_before_utc <= now < proof.not_valid_after_utc:
        raise AnchorRefused("the proof is not valid now")
    return anchor


MAX_PROVEN = 16
"""Anchors with proofs the clock helper looks at (a rollover every few years adds one)."""


def proven_anchors(pairs: list[tuple[bytes, bytes]], trusted: list[x509.Certificate]) -> list[x509.Certificate]:
    """The anchors of ``pairs`` (anchor, proof) that a trusted CA vouches for, directly or through another anchor
    proven so (the second rollover's root is proven by the first's); validity periods set aside.  The rest is
    left out."""
    found: list[x509.Certificate] = []
    pending = pairs[:MAX_PROVEN]
    while pending:
        left = []
        for anchor_pem, proof_pem in pending:
            try:
                found.append(verify_anchor(anchor_pem, proof_pem, trusted + found, None))
            except AnchorRefused:
                left.append((anchor_pem, proof_pem))
        if len(left) == len(pending):
            break
        pending = left
    return found


@dataclass(frozen=True)
class Issuer:
    """A trusted CA and the CRL of its certificates."""

    cert: x509.Certificate
    crl: CrlCache


class TrustStore:
    def __init__(self, directory: Path, factory_ca: Path, factory_crl: CrlCache, grace: timedelta) -> None:
        self.directory = directory
        self.factory = x509.load_pem_x509_certificate(factory_ca.read_bytes())
        self.factory_crl = factory_crl
        self.grace = grace
        directory.mkdir(parents=True, exist_ok=True)
        self.version = 0
        """Changes each time the anchors change (TLS contexts are rebuilt)."""
        self._added = self._load_added()
        self._crls = {fingerprint(c): CrlCache(self._crl_file(c), c, grace) for c in self._added}
        self._write_bundle()

    @property
    def anchors_file(self) -> Path:
        return self.directory / "anchors.pem"

    @property
    def bundle_file(self) -> Path:
        """Every anchor in use, for the TLS contexts."""
        return self.directory / "bundle.pem"

    @property
    def proofs_file(self) -> Path:
        """The cross-certificate of each added anchor, for the clock helper."""
        return self.directory / "proofs.pem"

    @property
    def retired_file(self) -> Path:
        return self.directory / "retired.json"

    def _crl_file(self, certificate: x509.Certificate) -> Path:
        return self.directory / f"crl-{fingerprint(certificate)[:16]}.der"

    def _load_added(self) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(self.anchors_file.read_bytes())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            log.error("%s unreadable, added trust anchors ignored: %s", self.anchors_file, exc)
            return []

    def _retired(self) -> set[str]:
        try:
            value = json.loads(self.retired_file.read_text())
        except (OSError, ValueError):
            return set()
        return {str(v) for v in value} if isinstance(value, list) else set()

    def issuers(self) -> list[Issuer]:
        retired = self._retired()
        issuers = [Issuer(self.factory, self.factory_crl)] + [Issuer(c, self._crls[fingerprint(c)]) for c in self._added]
        return [i for i in issuers if fingerprint(i.cert) not in retired]

    def anchors(self) -> list[x509.Certificate]:
        return [i.cert for i in self.issuers()]

    def issuer_of(self, certificate: x509.Certificate) -> Issuer | None:
        return next((i for i in self.issuers() if signed_by(certificate, i.cert)), None)

    def _write_bundle(self) -> None:
        write_atomically(self.bundle_file, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.anchors()))
        self.version += 1

    def describe(self) -> list[dict[str, str]]:
        return [{"subject": c.subject.rfc4514_string(), "sha256": fingerprint(c),
                 "not_after": c.not_valid_after_utc.isoformat()} for c in self.anchors()]

    # -- changes (``trust.update``, ``trust.retire``) ---------------------------------------

    def add(self, anchor_pem: bytes, proof_pem: bytes, crl_der: bytes, crl_url: str | None,
            now: datetime) -> tuple[x509.Certificate, bool]:
        """Trust a new root proven by a trusted CA; its CRL comes with it (or a DSO certificate it issued could not
        be checked).  Sent again, it only refreshes that CRL.  Returns the anchor and whether it is new."""
        anchor = verify_anchor(anchor_pem, proof_pem, self.anchors(), now)
        fp = fingerprint(anchor)
        known = self._crls.get(fp) if fp != fingerprint(self.factory) else self.factory_crl
        crl = known or CrlCache(self._crl_file(anchor), anchor, self.grace)
        try:
            crl.store(crl_der)
        except RevocationError as exc:
            raise AnchorRefused(f"the CRL that came with the anchor is refused: {exc}") from None
        if crl_url is not None:
            write_atomically(self._url_file(anchor), crl_url.encode())
        if fp != fingerprint(self.factory):  # sent again: an anchor added before proofs were kept gets its proof
            self._keep_proof(anchor, x509.load_pem_x509_certificate(proof_pem))
        if fp in {fingerprint(c) for c in self.anchors()}:
            return anchor, False
        write_atomically(self.retired_file, json.dumps(sorted(self._retired() - {fp})).encode())
        self._added = [c for c in self._added if fingerprint(c) != fp] + [anchor]
        write_atomically(self.anchors_file, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self._added))
        self._crls[fp] = crl
        self._write_bundle()
        return anchor, True

    def _proofs(self) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(self.proofs_file.read_bytes())
        except (OSError, ValueError):
            return []

    def _keep_proof(self, anchor: x509.Certificate, proof: x509.Certificate) -> None:
        kept = [p for p in self._proofs() if not _certifies(p, anchor)]
        write_atomically(self.proofs_file, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [*kept, proof]))

    def proven(self) -> list[tuple[bytes, bytes]]:
        """(anchor, proof) PEMs of the added anchors in use that have a proof kept: what the clock helper may
        trust beside the factory CA once it checked the proofs itself."""
        proofs = self._proofs()
        retired = self._retired()
        pairs = []
        for anchor in self._added:
            proof = next((p for p in proofs if _certifies(p, anchor)), None)
            if proof is not None and fingerprint(anchor) not in retired:
                pairs.append((anchor.public_bytes(serialization.Encoding.PEM), proof.public_bytes(serialization.Encoding.PEM)))
        return pairs

    def _url_file(self, certificate: x509.Certificate) -> Path:
        return self.directory / f"crl-{fingerprint(certificate)[:16]}.url"

    def crl_urls(self) -> list[tuple[CrlCache, str]]:
        """Where the added anchors' CRLs are refreshed from (``trust.update``'s ``crl_url``)."""
        found = []
        retired = self._retired()
        for cert in self._added:
            try:
                if fingerprint(cert) not in retired:
                    found.append((self._crls[fingerprint(cert)], self._url_file(cert).read_text().strip()))
            except OSError:
                continue
        return found

    def retire(self, sha256: str) -> x509.Certificate:
        """Stop trusting an anchor (the factory one included) once another one is trusted."""
        anchors = self.anchors()
        match = [c for c in anchors if fingerprint(c) == sha256.lower()]
        if not match:
            raise AnchorRefused(f"no trusted anchor has SHA-256 {sha256}")
        if len(anchors) == 1:
            raise AnchorRefused("the last trust anchor cannot be retired")
        write_atomically(self.retired_file, json.dumps(sorted(self._retired() | {sha256.lower()})).encode())
        self._write_bundle()
        return match[0]
