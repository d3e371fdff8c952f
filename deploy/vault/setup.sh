#!/bin/sh
# Prepare Vault / OpenBao for the svidgate signer: secrets engines, the least-privilege policy
# (signer-policy.hcl next to this script), and the ways a signer logs in.
#
#   VAULT_ADDR=https://vault:8200 VAULT_TOKEN=<admin token> deploy/vault/setup.sh
#
# Always: KV v2 at secret/ and Transit at transit/ (enabled when absent), the policy
# "svidgate-signer", AppRole auth with the role "svidgate-signer", and Kubernetes auth with the
# role "svidgate-signer" bound to the service account svidgate in SIGNER_NAMESPACE.
# Optional environment:
#   VAULT_CLI            bao (default when installed) or vault
#   SIGNER_NAMESPACE     Kubernetes namespace of the signer's service account (default svidgate)
#   KUBERNETES_HOST      API server URL for Kubernetes auth (default https://kubernetes.default.svc)
#   KUBERNETES_CA_CERT   file with the API server CA (required by OpenBao for Kubernetes auth;
#                        default: the in-cluster service-account CA when present)
#   SKIP_KUBERNETES=1    do not configure Kubernetes auth
#   TOKEN_FILE           also create a periodic token with only the signer policy, write it here
#   TOKEN_FILE_OWNER     chown the token file to this uid:gid (e.g. 10001:10001)
#   APPROLE_DIR          also write role_id and a fresh secret_id for the AppRole into this dir
set -eu

here=$(cd "$(dirname "$0")" && pwd)
POLICY=svidgate-signer
ROLE=svidgate-signer
SERVICE_ACCOUNT=svidgate
SIGNER_NAMESPACE=${SIGNER_NAMESPACE:-svidgate}
KUBERNETES_HOST=${KUBERNETES_HOST:-https://kubernetes.default.svc}
SA_CA=/var/run/secrets/kubernetes.io/serviceaccount/ca.crt

say() { printf 'svidgate vault setup: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

# Prerequisites, all checked before anything is changed.
CLI=${VAULT_CLI:-}
if [ -z "$CLI" ]; then
  if command -v bao >/dev/null 2>&1; then CLI=bao
  elif command -v vault >/dev/null 2>&1; then CLI=vault
  else die "neither bao nor vault is on PATH (install the OpenBao or Vault CLI, or set VAULT_CLI)"
  fi
fi
command -v "$CLI" >/dev/null 2>&1 || die "VAULT_CLI=$CLI is not on PATH"
[ -r "$here/signer-policy.hcl" ] || die "missing $here/signer-policy.hcl"
if [ -z "${VAULT_ADDR:-}${BAO_ADDR:-}" ]; then
  die "set VAULT_ADDR (or BAO_ADDR) to the server's address"
fi
"$CLI" token lookup >/dev/null 2>&1 \
  || die "$CLI cannot reach the server or the token is not valid (VAULT_ADDR/VAULT_TOKEN or BAO_ADDR/BAO_TOKEN)"
ca_file=
if [ "${SKIP_KUBERNETES:-0}" != 1 ]; then
  ca_file=${KUBERNETES_CA_CERT:-}
  if [ -z "$ca_file" ] && [ -f "$SA_CA" ]; then ca_file=$SA_CA; fi
  [ -n "$ca_file" ] || die "KUBERNETES_CA_CERT is required for Kubernetes auth (or set SKIP_KUBERNETES=1)"
  [ -r "$ca_file" ] || die "KUBERNETES_CA_CERT=$ca_file is not a readable file"
  grep -q -- '-----BEGIN CERTIFICATE-----' "$ca_file" \
    || die "KUBERNETES_CA_CERT=$ca_file holds no PEM certificate"
  case $KUBERNETES_HOST in
    https://*) ;;
    *) die "KUBERNETES_HOST=$KUBERNETES_HOST must be an https:// URL" ;;
  esac
fi
if [ -n "${TOKEN_FILE:-}" ] && [ ! -d "$(dirname "$TOKEN_FILE")" ]; then
  die "TOKEN_FILE=$TOKEN_FILE: its directory does not exist"
fi

secrets_enable() { # PATH TYPE [OPTIONS...]
  path=$1; shift
  if "$CLI" secrets list -format=json | grep -q "\"$path/\""; then
    say "secrets engine $path/ already enabled"
  else
    "$CLI" secrets enable -path="$path" "$@" >/dev/null
    say "enabled secrets engine $path/"
  fi
}

auth_enable() { # PATH TYPE
  if "$CLI" auth list -format=json | grep -q "\"$1/\""; then
    say "auth method $1/ already enabled"
  else
    "$CLI" auth enable -path="$1" "$2" >/dev/null
    say "enabled auth method $1/"
  fi
}

secrets_enable secret -version=2 kv
secrets_enable transit transit

"$CLI" policy write "$POLICY" "$here/signer-policy.hcl" >/dev/null
say "wrote policy $POLICY"

auth_enable approle approle
"$CLI" write "auth/approle/role/$ROLE" \
  token_policies="$POLICY" token_no_default_policy=true \
  token_ttl=1h token_max_ttl=24h secret_id_ttl=720h >/dev/null
say "wrote AppRole role $ROLE"

if [ "${SKIP_KUBERNETES:-0}" != 1 ]; then
  auth_enable kubernetes kubernetes
  "$CLI" write auth/kubernetes/config \
    kubernetes_host="$KUBERNETES_HOST" kubernetes_ca_cert="@$ca_file" >/dev/null
  "$CLI" write "auth/kubernetes/role/$ROLE" \
    bound_service_account_names="$SERVICE_ACCOUNT" \
    bound_service_account_namespaces="$SIGNER_NAMESPACE" \
    audience=vault \
    token_policies="$POLICY" token_no_default_policy=true \
    token_ttl=1h token_max_ttl=24h >/dev/null
  say "wrote Kubernetes auth role $ROLE for $SIGNER_NAMESPACE/$SERVICE_ACCOUNT"
fi

umask 077
if [ -n "${TOKEN_FILE:-}" ]; then
  "$CLI" token create -policy="$POLICY" -no-default-policy -period=24h \
    -display-name=svidgate-signer -field=token > "$TOKEN_FILE.tmp"
  mv "$TOKEN_FILE.tmp" "$TOKEN_FILE"
  if [ -n "${TOKEN_FILE_OWNER:-}" ]; then chown "$TOKEN_FILE_OWNER" "$TOKEN_FILE"; fi
  say "wrote a periodic signer token to $TOKEN_FILE"
fi
if [ -n "${APPROLE_DIR:-}" ]; then
  mkdir -p "$APPROLE_DIR"
  "$CLI" read -field=role_id "auth/approle/role/$ROLE/role-id" > "$APPROLE_DIR/role_id"
  "$CLI" write -f -field=secret_id "auth/approle/role/$ROLE/secret-id" > "$APPROLE_DIR/secret_id"
  say "wrote AppRole role_id and secret_id to $APPROLE_DIR"
fi
