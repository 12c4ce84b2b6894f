"""fcit: Federated Continual Instruction Tuning of multimodal models."""

from fcit import env as _env

_env.apply()  # before anything imports transformers or flwr

__version__ = "0.1.0"
