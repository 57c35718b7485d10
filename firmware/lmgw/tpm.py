"""The TPM 2.0 that holds the gateway's TLS keys (docs/tpm.md).

When gateway.toml has a ``[tpm]`` section the gateway's keys are TSS2 key files (``lmgw.tpmkey``) and
this process loads the tpm2-openssl provider into the OpenSSL its ``ssl`` module uses, through that
OpenSSL's own ``OSSL_PROVIDER_load`` (ctypes).  Only this process, and only when configured, loads it: no
OpenSSL configuration of the system changes, and a gateway without ``[tpm]`` never touches a TPM.  The
provider reads its TCTI from ``TPM2OPENSSL_TCTI`` (its configuration line is ignored), set here from
``[tpm] tcti``.

Nothing falls back to a file key: a configured TPM that is absent or refuses the key is a ``TpmError``
whose one line says what to check.  New keys (factory provisioning, renewal) are made inside the TPM
with the CSR signed there; the private key never exists outside it.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, get, section
from .tpmkey import MAX_FILE, TpmKey, TpmKeyError, is_tpm_key

if TYPE_CHECKING:
    from .libcrypto import Libcrypto

DEFAULT_TCTI = "device:/dev/tpmrm0"
"""The kernel's resource manager: it flushes what a process left loaded, so a crash cannot fill the TPM."""
PROVIDER_DIRS = (Path("/usr/lib/lmgw-tpm/ossl-modules"), Path("/usr/lib/ossl-modules"))
"""Where tpm2.so is looked for: the Debian image's private copy (rootfs/tpm-provider.sh), then Buildroot's."""
_MBSTRING_ASC = 0x1001


class TpmError(ConfigError):
    """A configured TPM cannot be used; the message is the one line for the journal and ``gw.status``."""


DEVICE_WAIT = 20.0
"""Seconds a missing TPM device node is waited for at start: a driver loaded as a module may come after us."""


@dataclass(frozen=True)
class TpmSettings:
    tcti: str
    provider_dir: Path | None
    device_wait: float = DEVICE_WAIT

    @classmethod
    def parse(cls, config: dict[str, Any]) -> TpmSettings | None:
        """``[tpm]``: None without the section (keys are files)."""
        if "tpm" not in config:
            return None
        table = section(config, "tpm")
        tcti = get(table, "tcti", str, "tpm", DEFAULT_TCTI)
        if ":" not in tcti and tcti not in ("device", "swtpm", "mssim", "tabrmd"):
            raise ConfigError(f"[tpm] tcti {tcti!r} is not a TCTI such as {DEFAULT_TCTI!r}")
        provider_dir = get(table, "provider_dir", str, "tpm", None)
        device_wait = get(table, "device_wait", float, "tpm", DEVICE_WAIT)
        if not 0 <= device_wait <= 600:
            raise ConfigError(f"[tpm] device_wait must be 0 to 600 seconds, got {device_wait:g}")
        return cls(tcti, Path(provider_dir) if provider_dir else None, device_wait)


def _device(tcti: str) -> Path | None:
    """The device node a ``device:`` TCTI opens."""
    kind, _, conf = tcti.partition(":")
    return Path(conf or "/dev/tpmrm0") if kind == "device" else None


_lock = threading.Lock()
_loaded: dict[str, Tpm] = {}


class Tpm:
    """The TPM this process's OpenSSL reaches through the tpm2 provider (one per process: one TCTI)."""

    def __init__(self, settings: TpmSettings, provider: Path, libcrypto: Libcrypto) -> None:
        self.settings = settings
        self.provider = provider
        self._crypto = libcrypto
        self.problem: str | None = None
        """The last failure with a TPM key, for ``gw.status`` (None once a key loads again)."""

    @classmethod
    def open(cls, settings: TpmSettings) -> Tpm:
        """Load the provider for ``settings.tcti``, or a TpmError saying why not."""
        with _lock:
            if _loaded:
                tpm = next(iter(_loaded.values()))
                if tpm.settings.tcti != settings.tcti:
                    raise TpmError(f"this process already uses the TPM at {tpm.settings.tcti}, not {settings.tcti}")
                return tpm
            device = _device(settings.tcti)
            deadline = time.monotonic() + settings.device_wait
            while device is not None and not device.exists() and time.monotonic() < deadline:
                time.sleep(0.5)  # once, at start, bounded: udev may still be loading the driver
            if device is not None and not device.exists():
                raise TpmError(f"TPM configured ([tpm] tcti = {settings.tcti!r}) but {device} does not exist: "
                               "is the TPM fitted and its driver loaded (tpm_tis_spi, tpm_tis)?")
            if device is not None and not os.access(device, os.R_OK | os.W_OK):
                raise TpmError(f"TPM {device} is not readable and writable by this user (group tss?)")
            provider = cls._find_provider(settings)
            os.environ["TPM2OPENSSL_TCTI"] = settings.tcti
            # The TPM's answer reaches our one log line through OpenSSL's error queue: tss2's own lines off.
            os.environ.setdefault("TSS2_LOG", "all+none")
            # Imported here, not with this module: ctypes is 2% of the agent's imports, paid at every start of
            # a gateway without a TPM too (docs/performance.md, "Session 14").
            from .libcrypto import Libcrypto
            crypto = Libcrypto()
            crypto.lib.ERR_clear_error()
            # Loading a provider by hand switches off OpenSSL's implicit default provider: load it first.
            if not crypto.lib.OSSL_PROVIDER_load(None, b"default"):
                raise TpmError(f"OpenSSL's default provider did not load: {crypto.errors()}")
            crypto.lib.OSSL_PROVIDER_set_default_search_path(None, str(provider.parent).encode())
            if not crypto.lib.OSSL_PROVIDER_load(None, b"tpm2"):
                raise TpmError(f"TPM at {settings.tcti} did not answer (tpm2 provider {provider}): {crypto.errors()}")
            tpm = _loaded[settings.tcti] = cls(settings, provider, crypto)
            return tpm

    @staticmethod
    def _find_provider(settings: TpmSettings) -> Path:
        dirs = [settings.provider_dir] if settings.provider_dir else list(PROVIDER_DIRS)
        for directory in dirs:
            if (directory / "tpm2.so").exists():
                return directory / "tpm2.so"
        raise TpmError(f"TPM configured but no tpm2-openssl provider (tpm2.so) in {', '.join(map(str, dirs))}")

    # -- keys ----------------------------------------------------------------------------

    def check(self, cert_file: Path, key_file: Path, what: str) -> None:
        """That ``key_file`` is a TSS2 key this TPM loads and that belongs to ``cert_file``; else TpmError."""
        try:
            data = key_file.read_bytes()
        except OSError as exc:
            raise self._fail(f"{what} key {key_file} unreadable: {exc.strerror}") from None
        if not is_tpm_key(data):
            raise self._fail(f"{what} key {key_file} is a plain key file, but [tpm] says keys are in the TPM "
                             "(provision the gateway with --tpm, or remove [tpm])")
        try:
            TpmKey.from_pem(data)
        except TpmKeyError as exc:
            raise self._fail(f"{what} key {key_file}: {exc}") from None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert_file), str(key_file))
        except ssl.SSLError as exc:
            raise self._fail(f"{what} key {key_file} does not work with the TPM at {self.settings.tcti}: "
                             f"{self.load_problem(data) or exc} (made by another TPM, or this TPM was cleared?)") from None
        self.problem = None

    def load_problem(self, pem: bytes) -> str | None:
        """What OpenSSL and the TPM say when the key is loaded (``ssl`` keeps only 'PEM lib'), or None."""
        lib = self._crypto.lib
        with _lock:
            lib.ERR_clear_error()
            bio = lib.BIO_new_mem_buf(pem, len(pem))
            pkey = lib.PEM_read_bio_PrivateKey(bio, None, None, None)
            lib.BIO_free(bio)
            if pkey:
                lib.EVP_PKEY_free(pkey)
                return None
            return self._crypto.errors()

    def _fail(self, problem: str) -> TpmError:
        self.problem = problem
        return TpmError(problem)

    def new_key(self, common_name: str) -> tuple[TpmKey, bytes]:
        """A new P-256 key made inside the TPM, and a CSR for ``common_name`` signed by it (PEM)."""
        lib = self._crypto.lib
        with _lock:
            lib.ERR_clear_error()
            context = pkey = request = bio = None
            try:
                context = lib.EVP_PKEY_CTX_new_from_name(None, b"EC", b"provider=tpm2")
                if context and lib.EVP_PKEY_keygen_init(context) == 1 \
                        and lib.EVP_PKEY_CTX_set_group_name(context, b"P-256") == 1:
                    pkey = self._crypto.generate(context)
                if not pkey:
                    raise self._fail(f"the TPM at {self.settings.tcti} did not make a key: {self._crypto.errors()}")
                bio = lib.BIO_new(lib.BIO_s_mem())
                if lib.PEM_write_bio_PrivateKey(bio, pkey, None, None, 0, None, None) != 1:
                    raise self._fail(f"the TPM key could not be written as TSS2 PEM: {self._crypto.errors()}")
                key_pem = self._crypto.bio_bytes(bio)
                lib.BIO_free(bio)
                request = lib.X509_REQ_new()
                name = common_name.encode()
                bio = lib.BIO_new(lib.BIO_s_mem())
                if not (lib.X509_REQ_set_version(request, 0) == 1
                        and lib.X509_NAME_add_entry_by_txt(lib.X509_REQ_get_subject_name(request), b"CN",
                                                           _MBSTRING_ASC, name, len(name), -1, 0) == 1
                        and lib.X509_REQ_set_pubkey(request, pkey) == 1
                        and lib.X509_REQ_sign(request, pkey, lib.EVP_sha256()) > 0
                        and lib.PEM_write_bio_X509_REQ(bio, request) == 1):
                    raise self._fail(f"the TPM did not sign the certificate request: {self._crypto.errors()}")
                csr = self._crypto.bio_bytes(bio)
            finally:
                for free, handle in ((lib.BIO_free, bio), (lib.X509_REQ_free, request), (lib.EVP_PKEY_free, pkey),
                                     (lib.EVP_PKEY_CTX_free, context)):
                    if handle:
                        free(handle)
        self.problem = None
        return TpmKey.from_pem(key_pem), csr

    def describe(self) -> dict[str, Any]:
        """For ``gw.status``."""
        return {"tcti": self.settings.tcti, "provider": str(self.provider), "problem": self.problem}


def open_for(settings: TpmSettings | None, cert_file: Path, key_file: Path) -> Tpm | None:
    """At start: the TPM if configured, with the factory key checked in it; None for a file key.
    A TPM key without ``[tpm]`` is an error too: nothing is guessed."""
    if settings is None:
        try:
            tpm_key = is_tpm_key(key_file.read_bytes()[:MAX_FILE])
        except OSError:
            return None  # reported where the key is loaded
        if tpm_key:
            raise TpmError(f"{key_file} is a TPM key (TSS2) but gateway.toml has no [tpm] section")
        return None
    tpm = Tpm.open(settings)
    tpm.check(cert_file, key_file, "factory")
    return tpm


def key_problem(tpm: Tpm | None, key: object, file: Path) -> str | None:
    """Why a loaded key (a cryptography key or a ``TpmKey``) cannot be used with this configuration, or None."""
    if tpm is None:
        return "a TPM key (TSS2) but gateway.toml has no [tpm] section" if isinstance(key, TpmKey) else None
    if not isinstance(key, TpmKey):
        return "a plain key file, but [tpm] says keys are in the TPM"
    try:
        tpm.check(file, file, "operational")
    except TpmError as exc:
        return str(exc)
    return None
