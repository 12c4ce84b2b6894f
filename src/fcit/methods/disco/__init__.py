"""DISCO as a small package: ``routing`` (pure server-side functions), ``method`` (the hooks), ``gate`` (inference)."""

from fcit.methods.disco.method import Disco, Params
from fcit.methods.disco.routing import (
    NEW,
    assign_slots,
    cosine_matrix,
    gates,
    greedy_threshold_clusters,
    route,
    route_sim,
    update_centres,
)

__all__ = ["Disco", "Params", "NEW", "assign_slots", "cosine_matrix", "gates", "greedy_threshold_clusters", "route",
           "route_sim", "update_centres"]
