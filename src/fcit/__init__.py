"""fcit: Federated Continual Instruction Tuning of multimodal models."""

__version__ = "0.1.0"
