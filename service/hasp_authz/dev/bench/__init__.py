"""Benchmark of the Check path: Envoy, hasp-authz and the gRPC floor side by side.

``make bench`` runs ``python -m hasp_authz.dev.bench`` and writes the result into
the "Check path" section of docs/benchmarks.md. Every process it starts listens
on 127.0.0.1 (or a Unix socket in a temporary folder), and every load is bounded
in request count and time.
"""
