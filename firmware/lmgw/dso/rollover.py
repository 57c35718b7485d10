"""CA rollover, DSO side: the CRLs of both CAs during the overlap, and ``trust.update`` for the gateways.

During the overlap ``[tls] ca_file`` is a bundle of both roots, the new one
first (gateways' certificates of either CA are accepted), ``[revocation]
crl_file`` is the new CA's CRL and ``previous_crl_file`` the old one's: both
are honoured.  With ``[rollover] anchor``/``proof``/``crl_file`` the DSO
gives the new root to every gateway whose ``gw.hello`` shows it lacks it
(``status.anchors``), so a gateway that was off during the push still gets
it.  See the runbook in docs/pki.md.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..config import ConfigError, get, path
from ..revocation import CrlCache, CrlSet, RevocationError, load_crl


def crl_checks(ca_file: Path, crl_file: Path, previous_crl_file: Path | None, grace: timedelta) -> CrlCache | CrlSet:
    """The revocation check of gateway certificates: one CRL, or both CAs' CRLs during a rollover."""
    roots = x509.load_pem_x509_certificates(ca_file.read_bytes())
    current = CrlCache(crl_file, roots[0], grace)
    if previous_crl_file is None:
        return current
    data = previous_crl_file.read_bytes()
    for root in roots[1:]:
        try:
            load_crl(data, root)
        except RevocationError:
            continue
        return CrlSet([current, CrlCache(previous_crl_file, root, grace)])
    raise ConfigError(f"[revocation] previous_crl_file {previous_crl_file} is not signed by a CA of {ca_file} "
                      "after the first (the bundle holds the new root first, then the old one)")


def trust_update_params(anchor: Path, proof: Path, crl: Path, crl_url: str | None) -> dict[str, Any]:
    """``trust.update`` parameters from the successor CA's files (``lmgw-pki rollover`` writes them)."""
    params: dict[str, Any] = {"anchor": anchor.read_text(), "proof": proof.read_text(),
                              "crl": base64.b64encode(crl.read_bytes()).decode()}
    if crl_url is not None:
        params["crl_url"] = crl_url
    return params


@dataclass(frozen=True)
class AnchorPush:
    """``[rollover]``: the new root every gateway should trust, with its proof and CRL."""

    anchor: Path
    proof: Path
    crl_file: Path
    crl_url: str | None
    sha256: str

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path) -> AnchorPush | None:
        if not table:
            return None
        anchor = path(table, "anchor", "rollover", base)
        try:
            sha256 = x509.load_pem_x509_certificate(anchor.read_bytes()).fingerprint(hashes.SHA256()).hex()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[rollover] anchor {anchor}: {exc}") from None
        return cls(anchor, path(table, "proof", "rollover", base), path(table, "crl_file", "rollover", base),
                   get(table, "crl_url", str, "rollover", None), sha256)

    def needed(self, status: dict[str, Any] | None) -> bool:
        """Whether a gateway's hello status shows it does not trust the new root yet."""
        anchors = (status or {}).get("anchors")
        return not isinstance(anchors, list) or self.sha256 not in anchors

    def params(self) -> dict[str, Any]:
        return trust_update_params(self.anchor, self.proof, self.crl_file, self.crl_url)
