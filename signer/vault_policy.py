"""The Vault / OpenBao policy a signer needs and nothing more, rendered from its key settings.

The one source of that text: ``svidgate up`` writes it to its dev server, the tests' OpenBao
writes it, and ``deploy/vault/signer-policy.hcl`` is it for the default settings (a test
checks). KV v2 data, metadata and destroy of the one secret, and the mount's config (read: its
``max_versions``, checked against what the key ring needs); Transit create/read/sign/rotate of
the one key; the token's own lookup and renewal. No wildcard unless a caller passes one.

``transit_revoke=True`` adds ``keys/NAME/config`` and ``keys/NAME/trim``, which ``Revoke`` needs
to drop a Transit version. It is off by default: config also governs exportability and
deletion of the key, so the least-privilege policy leaves trimming to an operator.
"""

from __future__ import annotations


def signer_policy_hcl(
    *,
    kv_mount: str,
    kv_path: str,
    transit_mount: str,
    transit_key: str,
    transit_revoke: bool = False,
) -> str:
    """The least-privilege policy for a signer whose keys live at ``kv_mount``/``kv_path``
    (vault-kv) or in the Transit key ``transit_mount``/``transit_key`` (vault-transit): the
    fields of the same names in signer.yaml's ``keys.vault``."""
    revoke = (
        f"""
# Revoke on vault-transit (optional): drop versions from the oldest end.
path "{transit_mount}/keys/{transit_key}/config" {{
  capabilities = ["update"]
}}
path "{transit_mount}/keys/{transit_key}/trim" {{
  capabilities = ["update"]
}}
"""
        if transit_revoke
        else ""
    )
    return f"""\
# svidgate signer: least privilege (svidgate.signer.vault_policy.signer_policy_hcl).

# vault-kv key source: one KV v2 secret, each version one signing key (check-and-set writes).
path "{kv_mount}/data/{kv_path}" {{
  capabilities = ["create", "read", "update"]
}}
path "{kv_mount}/metadata/{kv_path}" {{
  capabilities = ["read"]
}}
# the mount's max_versions (when the secret sets none): a write must never prune a live key
path "{kv_mount}/config" {{
  capabilities = ["read"]
}}
# removed keys are destroyed (their versions' data), never the whole secret
path "{kv_mount}/destroy/{kv_path}" {{
  capabilities = ["update"]
}}

# vault-transit key source: the private key never leaves Vault.
path "{transit_mount}/sign/{transit_key}" {{
  capabilities = ["update"]
}}
path "{transit_mount}/keys/{transit_key}" {{
  capabilities = ["create", "read", "update"]
}}
path "{transit_mount}/keys/{transit_key}/rotate" {{
  capabilities = ["update"]
}}
{revoke}
# Its own token: look up and renew before expiry.
path "auth/token/lookup-self" {{
  capabilities = ["read"]
}}
path "auth/token/renew-self" {{
  capabilities = ["update"]
}}
"""
