"""Code the services share: settings base, logging, errors, Postgres and gRPC server helpers.

Server-side only: the TV brain (`omega_brain`) never imports this package.
"""
