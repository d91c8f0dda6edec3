"""bbmsl key material: generate a merchant key pair, load and use the merchant's public key.

BBMSL exchanges RSA 2048 keys with the merchant in advance: the merchant signs with its private
key (PKCS#8 PEM), the gateway verifies with the merchant's public key. The sandbox only ever holds
the public half; the private half is written for the worker (`REFUNDQ_BBMSL_PRIVATE_KEY_FILE`).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

PRIVATE_KEY_NAME = "bbmsl_private.pem"
PUBLIC_KEY_NAME = "bbmsl_public.pem"


def generate_bbmsl_keypair(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a fresh RSA 2048 pair into `directory`: the private key as unencrypted PKCS#8 PEM
    (mode 0600), the public key as SubjectPublicKeyInfo PEM. Returns (private, public) paths."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_path = target / PRIVATE_KEY_NAME
    public_path = target / PUBLIC_KEY_NAME
    private_pem = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    # Created 0600 from the start rather than chmod-ed afterwards, so the key is never readable
    # by others, not even for an instant.
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(
        private_key.public_key().public_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    return private_path, public_path


def load_rsa_public_key(pem: str) -> rsa.RSAPublicKey:
    """Parse a SubjectPublicKeyInfo PEM; `ValueError` if it is not an RSA public key."""
    key = serialization.load_pem_public_key(pem.encode("utf-8"))
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"expected an RSA public key, got {type(key).__name__}")
    return key


def verify_sha256_with_rsa(public_key: rsa.RSAPublicKey, message: str, signature_b64: str) -> bool:
    """SHA256withRSA (PKCS#1 v1.5) over the exact UTF-8 bytes of `message`, signature base64."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        public_key.verify(signature, message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True
