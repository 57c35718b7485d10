"""OpenSSL's functions the TPM support calls (``lmgw.tpm``), through ctypes, from the libcrypto that Python's
``ssl`` module is linked with: the provider loaded there is the one every ``ssl`` context of this process
uses.  Python's ``ssl`` has no API for providers, keys made by a provider or certificate requests."""

from __future__ import annotations

import ctypes
import importlib
from typing import Any

_BIO_CTRL_INFO = 3


class Libcrypto:
    """The OpenSSL functions used here, from the libcrypto that Python's ``ssl`` is linked with."""

    def __init__(self) -> None:
        # Through _ssl's handle: the libcrypto it is linked with, whatever its file name.
        lib = ctypes.CDLL(getattr(importlib.import_module("_ssl"), "__file__", None) or "libcrypto.so.3")
        p, s, i, u = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_ulong
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "OSSL_PROVIDER_load": (p, [p, s]),
            "OSSL_PROVIDER_set_default_search_path": (i, [p, s]),
            "ERR_get_error_all": (u, [p, p, p, ctypes.POINTER(s), ctypes.POINTER(i)]),
            "ERR_error_string_n": (None, [u, s, ctypes.c_size_t]),
            "ERR_clear_error": (None, []),
            "BIO_new": (p, [p]), "BIO_s_mem": (p, []), "BIO_new_mem_buf": (p, [s, i]), "BIO_free": (i, [p]),
            "BIO_ctrl": (ctypes.c_long, [p, i, ctypes.c_long, p]),
            "EVP_PKEY_CTX_new_from_name": (p, [p, s, s]), "EVP_PKEY_CTX_free": (None, [p]),
            "EVP_PKEY_keygen_init": (i, [p]), "EVP_PKEY_CTX_set_group_name": (i, [p, s]),
            "EVP_PKEY_generate": (i, [p, ctypes.POINTER(p)]), "EVP_PKEY_free": (None, [p]),
            "PEM_write_bio_PrivateKey": (i, [p, p, p, p, i, p, p]),
            "PEM_read_bio_PrivateKey": (p, [p, p, p, p]),
            "X509_REQ_new": (p, []), "X509_REQ_free": (None, [p]), "X509_REQ_set_version": (i, [p, ctypes.c_long]),
            "X509_REQ_get_subject_name": (p, [p]), "X509_REQ_set_pubkey": (i, [p, p]),
            "X509_NAME_add_entry_by_txt": (i, [p, s, i, s, i, i, i]),
            "EVP_sha256": (p, []), "X509_REQ_sign": (i, [p, p, p]), "PEM_write_bio_X509_REQ": (i, [p, p]),
        }
        for name, (restype, argtypes) in signatures.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        self.lib = lib

    def errors(self) -> str:
        """OpenSSL's error queue as one line (the provider puts the TPM's answer there), emptied."""
        lines: list[str] = []
        data, flags = ctypes.c_char_p(), ctypes.c_int()
        buffer = ctypes.create_string_buffer(256)
        while code := self.lib.ERR_get_error_all(None, None, None, ctypes.byref(data), ctypes.byref(flags)):
            self.lib.ERR_error_string_n(code, buffer, len(buffer))
            text = buffer.value.decode(errors="replace").split(":", 5)[-1]
            detail = data.value.decode(errors="replace") if data.value and flags.value & 0x02 else ""
            line = detail if detail and text.startswith("reason(") else f"{text} ({detail})" if detail else text
            if line not in lines:
                lines.append(line)
        return "; ".join(lines) or "no detail from OpenSSL"

    def bio_bytes(self, bio: int) -> bytes:
        pointer = ctypes.c_void_p()
        length = self.lib.BIO_ctrl(bio, _BIO_CTRL_INFO, 0, ctypes.byref(pointer))
        return ctypes.string_at(pointer.value, length) if pointer.value and length > 0 else b""

    def generate(self, context: int) -> int | None:
        """``EVP_PKEY_generate`` with an initialised ``context``: the new key, or None (see ``errors``)."""
        key = ctypes.c_void_p()
        return key.value if self.lib.EVP_PKEY_generate(context, ctypes.byref(key)) == 1 else None
