"""fcit on Flower (Message API, flwr 1.41): a ServerApp that drives the stage x round loop and a ClientApp that runs
the project's client update, both calling the same method hooks as the in-process engine.

* ``records``: what travels in a Message (tensors in ArrayRecords, everything else as one JSON ConfigRecord).
* ``client_app``: the ClientApp (``app``): hello / identity / train / stage_end.
* ``server_app``: the ServerApp (``app``) and ``FlowerEngine``, the Grid-backed ``run_stage``.
* ``launch``: ``fcit run --engine flower-sim | flower`` and ``fcit node``.
"""

import os

# Flower must never install the app's dependencies at run time (it would pull a CUDA torch), phone home or check for
# updates; these are read when flwr's modules load, so they are set before any of them is imported. Hub offline mode
# is set here too, so that Flower's own processes (Ray workers, ClientApp processes) inherit it even if something
# imports huggingface_hub before fcit's model loader sets it.
for _k, _v in {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
               "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)
