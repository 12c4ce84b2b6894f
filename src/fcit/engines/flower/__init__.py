"""fcit's clients on Flower (Message API, flwr 1.41).

* ``records``: what travels in a Message (tensors in ArrayRecords, everything else as one JSON ConfigRecord).
* ``transport``: the server side of the round loop over a Flower Grid (``FlowerTransport``).
* ``client_app``: the ClientApp (``app``): hello / identity / train / stage_end, running ``engines.client``.
* what a node does with a message, on objects kept for the run, is ``fcit.engines.resident``.
* ``worker``: the node worker ``fcit node`` starts beside its SuperNode, so the model outlives Flower's one process
  per message; the ClientApp forwards each message to it.

The ServerApp and the launchers (``fcit run --engine flower-sim | flower``, ``fcit node``) sit above the experiment
in ``fcit.launch``. Flower's environment switches are set by ``fcit.env`` when ``fcit`` is imported.
"""
