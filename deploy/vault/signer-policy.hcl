# svidgate signer: least privilege (svidgate.signer.vault_policy.signer_policy_hcl).

# vault-kv key source: one KV v2 secret, each version one signing key (check-and-set writes).
path "secret/data/svidgate/signing-keys" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/svidgate/signing-keys" {
  capabilities = ["read"]
}
# the mount's max_versions (when the secret sets none): a write must never prune a live key
path "secret/config" {
  capabilities = ["read"]
}
# removed keys are destroyed (their versions' data), never the whole secret
path "secret/destroy/svidgate/signing-keys" {
  capabilities = ["update"]
}

# vault-transit key source: the private key never leaves Vault.
path "transit/sign/svidgate-jwt" {
  capabilities = ["update"]
}
path "transit/keys/svidgate-jwt" {
  capabilities = ["create", "read", "update"]
}
path "transit/keys/svidgate-jwt/rotate" {
  capabilities = ["update"]
}

# Its own token: look up and renew before expiry.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
