"""Operator certificates: who may use the DSO's operator API, and with which role.

An operator certificate is a TLS client certificate of the LMGW CA (or of a separate operator CA) that
carries, besides ``clientAuth`` (OpenSSL refuses a TLS client without it), two marks no gateway
certificate ever has:

- the extended key usage ``OPERATOR_EKU`` ("LMGW operator API client"): the operator API accepts only
  certificates with it, the gateway WebSocket endpoint refuses every certificate with it;
- exactly one certificate policy of ``ROLE_POLICIES``: the role (``read-only`` or ``operator``).

The OIDs are UUID-derived (``2.25.<UUID>``, ITU-T X.667), like ``OPERATIONAL_POLICY``: a private arc
anyone may use without registration, so they can never collide with a public OID an unrelated CA
puts into a certificate.  A key usage says what the certificate is *for*, so it is the natural mark
to tell operator from gateway certificates; the role is a policy, a statement under which the
certificate was issued, and stays separate so that one EKU check suffices on the gateway endpoint
whatever roles exist later.
"""

from __future__ import annotations

import enum
import re

from cryptography import x509

OPERATOR_EKU = x509.ObjectIdentifier("2.25.277896846892372107966899275595206820340")
"""Extended key usage of an operator API client certificate (never in a gateway certificate)."""
OPERATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@+-]{0,63}$")
"""An operator certificate's CN: a person or a system (``alice@dso.example``, ``scada-1``)."""


class Role(enum.Enum):
    READ_ONLY = "read-only"
    """Lists, status, events, metrics."""
    OPERATOR = "operator"
    """Everything read-only may, plus calls, sheds, revocations, updates, tags, jobs."""

    def allows(self, needed: Role) -> bool:
        return self is Role.OPERATOR or needed is Role.READ_ONLY


ROLE_POLICIES = {
    Role.READ_ONLY: x509.ObjectIdentifier("2.25.112070828289239449076178454529607288512"),
    Role.OPERATOR: x509.ObjectIdentifier("2.25.269995995005038915633276708455058294096"),
}


def is_operator_certificate(certificate: x509.Certificate) -> bool:
    """True when the certificate is marked for the operator API (whatever its role)."""
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return OPERATOR_EKU in usage


def operator_role(certificate: x509.Certificate) -> Role | None:
    """The role of an operator certificate; None when it is not one or does not carry exactly one role."""
    if not is_operator_certificate(certificate):
        return None
    try:
        policies = certificate.extensions.get_extension_for_class(x509.CertificatePolicies).value
    except x509.ExtensionNotFound:
        return None
    roles = [role for role, oid in ROLE_POLICIES.items() if any(p.policy_identifier == oid for p in policies)]
    return roles[0] if len(roles) == 1 else None
