"""Small secrets sealed under a KMS key for storage in etcd: a fresh data key per secret
(envelope encryption, AES-256-GCM), bound by `context` to the record it belongs to, so a
sealed value copied into another record does not open there."""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel

from .kms import Kms, KmsError

SECRETS_KEY_ALIAS = "alias/dbplane/secrets"


class SealedElsewhere(KmsError):
    """The data key opened but the value does not: it was sealed for another record
    (copied) or changed."""


class SealedSecret(BaseModel):
    kms_key_id: str
    wrapped_key: str            # base64 of the KMS-wrapped data key
    nonce: str
    ciphertext: str

    def __repr__(self) -> str:
        return f"SealedSecret(kms_key_id={self.kms_key_id!r})"


def seal(kms: Kms, key_ref: str, plaintext: str, context: str) -> SealedSecret:
    data_key = kms.generate_data_key(key_ref)
    nonce = os.urandom(12)
    ciphertext = AESGCM(data_key.plaintext).encrypt(nonce, plaintext.encode(), context.encode())
    return SealedSecret(kms_key_id=data_key.key_id, wrapped_key=base64.b64encode(data_key.wrapped).decode(),
                        nonce=base64.b64encode(nonce).decode(),
                        ciphertext=base64.b64encode(ciphertext).decode())


def unseal(kms: Kms, sealed: SealedSecret, context: str) -> str:
    key = kms.decrypt_data_key(base64.b64decode(sealed.wrapped_key))
    try:
        return AESGCM(key).decrypt(base64.b64decode(sealed.nonce), base64.b64decode(sealed.ciphertext),
                                   context.encode()).decode()
    except InvalidTag:
        raise SealedElsewhere(f"a sealed secret of {context} fails authentication (tampered, or "
                              "copied from another record)", "recreate the secret (e.g. a new access key)",
                              code="kms_decrypt_failed") from None
