"""Centralized multi-task learning: the upper bound of the benchmark."""

from fcit.methods.base import Kind, Method


class MultiTask(Method):
    name = "mtl"
    summary = (
        "Centralized upper bound: one LoRA trained on the union of all stages' data with the federated run's "
        "sample budget (local_epochs passes), evaluated once."
    )
    kind = Kind.CENTRALIZED
    continual = False
