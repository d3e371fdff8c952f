"""Key sources: file, Vault KV v2, Vault Transit."""
