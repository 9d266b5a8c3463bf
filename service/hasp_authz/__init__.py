"""Envoy ext_authz sidecar that authorizes requests by API key, org BAA and scope."""

__version__ = "0.1.0"
