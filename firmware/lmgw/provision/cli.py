"""``lmgw-provision``: give one gateway its identity, at the factory.

    lmgw-provision build/image/lmgw.img --gateway-id GW-0001 --ca-dir /srv/lmgw-ca \\
        --dso-url wss://dso.example.net/lmgw --crl-url http://pki.example.net/crl.der \\
        --ocsp-url http://pki.example.net/ocsp

Generates the device key (or, with ``--csr``, makes the key and a CSR on this
station and has the CA sign the CSR, so the CA never sees the key; with ``--tpm``
the key is made inside the board's TPM and only its TPM-wrapped blob is written), issues the
certificate (recorded in the CA inventory), and writes key, certificate, CA
bundle, gateway.toml and a machine-id into the image's identity partition
without mounting anything.  An existing identity is never overwritten unless
``--force`` is given.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..config import ConfigError
from ..gateway.config import GatewayConfig
from ..gateway.renewal import RenewalSettings
from ..gateway.timesync import TimeSettings
from ..modbus.config import parse_lm_sections
from ..modbus.profile import load_profile
from ..pki.ca import CertificateAuthority, Issued, PkiError, check_gateway_id
from ..tpm import Tpm, TpmError, TpmSettings
from . import gpt, identity


class ProvisionError(Exception):
    pass


def _issue(ca: CertificateAuthority, gateway_id: str, csr_flow: bool, tpm: Tpm | None = None) -> Issued:
    if tpm is not None:  # made in the board's TPM, CSR signed there: only the TPM-wrapped blob comes out
        tpm_key, csr_pem = tpm.new_key(gateway_id)
        issued = ca.sign_csr(csr_pem)
        return Issued(issued.common_name, issued.serial, issued.cert_pem, tpm_key.pem)
    if not csr_flow:
        return ca.issue_gateway(gateway_id)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, gateway_id)]))
           .sign(key, hashes.SHA256()))
    issued = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Issued(issued.common_name, issued.serial, issued.cert_pem, key_pem)


def _config(args: argparse.Namespace) -> bytes:
    extra = args.lm_config.read_text() if args.lm_config else ""
    text = identity.gateway_toml(args.dso_url, args.crl_url, args.proxy, extra, args.ocsp_url,
                                 tpm=args.tpm is not None)
    try:
        parsed = tomllib.loads(text)
        GatewayConfig.parse(parsed, Path("/identity"))
        RenewalSettings.parse(parsed)
        TimeSettings.parse(parsed)
        for lm in parse_lm_sections(parsed).lms.values():
            load_profile(lm.profile)  # a typo in a profile name shows here, not on site
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise ProvisionError(f"the gateway configuration would be invalid: {exc}") from None
    return text.encode()


def provision(args: argparse.Namespace) -> str:
    check_gateway_id(args.gateway_id)
    config = _config(args)
    partition = gpt.find(str(args.target), "identity")
    with identity.scratch() as tmp:
        work = Path(tmp)
        current = work / "current.ext4"
        identity.copy_out(str(args.target), partition.offset, partition.size, current)
        existing = identity.read_file(current, "device.crt")
        if existing and not args.force:
            holder = x509.load_pem_x509_certificate(existing).subject.rfc4514_string()
            raise ProvisionError(f"{args.target} already holds an identity ({holder}); use --force to replace it")
        ca = CertificateAuthority.open(args.ca_dir)
        tpm = Tpm.open(TpmSettings(args.tpm, args.tpm_provider_dir)) if args.tpm else None
        issued = _issue(ca, args.gateway_id, args.csr, tpm)
        assert issued.key_pem is not None
        crl = ca.publish_crl().public_bytes(serialization.Encoding.DER)
        files = {"device.key": issued.key_pem, "device.crt": issued.cert_pem, "ca.crt": ca.cert_pem,
                 "crl.der": crl, "gateway.toml": config, "machine-id": identity.new_machine_id()}
        image = identity.build_filesystem(files, partition.size, work)
        identity.copy_in(image, str(args.target), partition.offset, partition.size)
    return f"{args.target}: gateway {args.gateway_id} provisioned (certificate serial {issued.serial:x})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmgw-provision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path, help="disk image file or block device (e.g. /dev/sdb)")
    parser.add_argument("--gateway-id", required=True, help="certificate CN, e.g. the serial number on the label")
    parser.add_argument("--ca-dir", type=Path, required=True)
    parser.add_argument("--dso-url", required=True, help="wss://…")
    parser.add_argument("--crl-url")
    parser.add_argument("--ocsp-url", help="OCSP responder asked about the DSO certificate at every connection")
    parser.add_argument("--proxy", help="http://[user:password@]host:port, if the site needs one")
    parser.add_argument("--lm-config", type=Path, help="TOML with the site's [[lm]]/[[bus]] sections")
    parser.add_argument("--csr", action="store_true", help="make the key here and have the CA sign a CSR")
    parser.add_argument("--tpm", metavar="TCTI", help="make the key inside the board's TPM, reached from this "
                        "station by TCTI (device:/dev/tpmrm0, swtpm:port=2321); gateway.toml gets [tpm] (docs/tpm.md)")
    parser.add_argument("--tpm-provider-dir", type=Path, help="directory of tpm2.so (rootfs/tpm-provider.sh output)")
    parser.add_argument("--force", action="store_true", help="replace an existing identity")
    parser.add_argument("--renew", action="store_true",
                        help="renew an operational certificate over the channel: the default, accepted for old scripts")
    args = parser.parse_args(argv)
    try:
        print(provision(args))
    except (ProvisionError, PkiError, gpt.PartitionError, OSError, TpmError) as exc:
        print(f"lmgw-provision: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
