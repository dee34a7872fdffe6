"""Running fedtl on real machines: Flower's Deployment Engine with TLS and node authentication.

``certs`` creates the certificate authority, the SuperLink's TLS certificate and the
SuperNodes' authentication keys (``fedtl deploy certs OUT_DIR``).
"""
