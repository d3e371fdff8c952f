#!/bin/sh
# Dev PKI for the compose stack: a CA for example.org and the SVIDs the services use, created
# once in the pki volume (delete the volume to start over).
set -eu
dir=${PKI_DIR:-/var/lib/svidgate/pki}
[ -f "$dir/ca/root.crt" ] || svidgate pki init --trust-domain example.org --dir "$dir/ca"

issue() { # NAME SPIFFE_ID [pki issue options...]
  name=$1; id=$2; shift 2
  [ -f "$dir/$name.crt" ] || svidgate pki issue --dir "$dir/ca" --spiffe-id "$id" \
    --out "$dir/$name" --ttl 720h "$@"
}
issue gateway spiffe://example.org/gateway --dns gateway --dns localhost --ip 127.0.0.1
issue upstream spiffe://example.org/ns/demo/sa/echo --dns upstream
issue client spiffe://example.org/ns/demo/sa/client
echo "dev PKI ready in $dir"
