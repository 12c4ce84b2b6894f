"""Federated multi-task learning: the federated upper bound of the benchmark.

Finetune's one LoRA and FedAvg (or the configured server optimizer), trained in one stage on the union of all the
continual run's tasks, partitioned over the same clients like any stage, for one stage's rounds: each client holds
every task's share, so that is the continual run's sample budget (``Scenario(union=True)`` builds that stage). Since the scenario, not a hook, supplies the union,
the round loop runs it unchanged on every engine. It is the reference's MTL row as most likely run (a federated run
over the union), beside ``mtl``, the centralized one.
"""

from fcit.methods.base import Method


class MultiTaskFed(Method):
    name = "mtl-fed"
    summary = (
        "Federated upper bound: one LoRA, FedAvg, one stage over the union of all stages' data partitioned over the "
        "clients, one stage's rounds (the continual run's sample budget); Last only."
    )
    union_stages = True
    continual = False
