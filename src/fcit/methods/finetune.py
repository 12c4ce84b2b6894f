"""Finetune: the base class's defaults are exactly this method."""

from fcit.methods.base import Method


class Finetune(Method):
    pass
