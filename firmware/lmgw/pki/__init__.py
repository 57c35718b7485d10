"""The LMGW PKI: our own CA, gateway and DSO certificates, revocation (CRL, OCSP)."""
