"""svidgate pki: SPIFFE IDs, X.509-SVIDs, trust bundles and a small CA for dev and tests."""
