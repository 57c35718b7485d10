"""CA rollover, DSO side: the CRLs of both CAs during the overlap, and ``trust.update`` for the gateways.

During the overlap ``[tls] ca_file`` is a bundle of both roots, the new one
first (gateways' certificates of either CA are accepted), ``[revocation]
crl_file`` is the new CA's CRL and ``previous_crl_file`` the old one's: both
are honoured.  See the runbook in docs/pki.md.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from ..config import ConfigError
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
