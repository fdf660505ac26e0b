"""Constellation: the sharded gRPC sync server (package ``omega_constellation``).

Handlers: `servicers.ConstellationSyncServicer` (device API) and `servicers.FederationServicer`
(worker API); logic in `service`, storage in `store`, validation in `converters`.
"""
