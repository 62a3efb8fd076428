"""A gRPC gateway to the swarm, for clients in any language (`swarm gateway`)."""

from swarm.gateway.service import GatewayLimits, GatewayService, serve

__all__ = ["GatewayLimits", "GatewayService", "serve"]
