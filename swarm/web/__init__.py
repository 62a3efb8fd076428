"""Small HTTP pages for people: the live swarm map."""

from swarm.web.map_page import MapPage

__all__ = ["MapPage"]
