"""svidgate gateway: aiohttp TLS-terminating reverse proxy with SPIFFE identity and RBAC."""
