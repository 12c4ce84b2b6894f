"""Registry of continual methods: ``fcit methods`` lists it, ``method.name`` picks from it."""

from __future__ import annotations

from fcit.config import Config
from fcit.errors import FcitError
from fcit.methods.base import Method
from fcit.methods.disco import Disco
from fcit.methods.ewc import Ewc
from fcit.methods.finetune import Finetune
from fcit.methods.lwf import Lwf
from fcit.methods.mlora import MLora
from fcit.methods.moelora import MoELora
from fcit.methods.olora import OLora
from fcit.methods.mtl import MultiTask
from fcit.methods.mtl_fed import MultiTaskFed
from fcit.methods.zeroshot import ZeroShot

REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (ZeroShot, Finetune, Ewc, Lwf, OLora, MLora, MoELora, Disco, MultiTask, MultiTaskFed)
}


def build_method(cfg: Config) -> Method:
    cls = REGISTRY.get(cfg.method.name)
    if cls is None:
        raise FcitError(f"config: method.name: unknown method {cfg.method.name!r}; known: {', '.join(REGISTRY)}")
    return cls(cfg)
