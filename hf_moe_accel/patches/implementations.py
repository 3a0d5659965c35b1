"""The implementation names accelerate() writes into a model's configs, and reading them back.

Transformers picks each attention and experts forward by the name in `config._attn_implementation`
and `config._experts_implementation`. accelerate() writes our registered names there
(patches/attention.py, patches/experts.py), so the configs say what runs, and a user's own
`set_attn_implementation(...)` / `set_experts_implementation(...)` is honoured as in stock.

We write them as `ImplementationName`s: a `str` equal to our name everywhere Transformers reads it,
that remembers the stock name it replaced. Copies keep it (`copy.deepcopy` of an accelerated model
is accelerated); a pickle writes the stock name instead, so that a pickled accelerated model loads as
a stock one, also in a process without this package (whose names Transformers wouldn't know).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedConfig


class ImplementationName(str):
    """Our implementation name as a config holds it; `stock` is the name it replaced (pickled instead)."""

    stock: str | None

    def __new__(cls, name: str, stock: str | None) -> ImplementationName:
        self = super().__new__(cls, name)
        self.stock = stock
        return self

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (str, (self.stock,)) if self.stock is not None else (type(None), ())

    def __copy__(self) -> ImplementationName:
        return self

    def __deepcopy__(self, memo: dict) -> ImplementationName:
        return self


def stock_name(name: str | None) -> str | None:
    """The stock name behind `name`: its `stock` for a name we wrote, else `name` itself."""
    return name.stock if isinstance(name, ImplementationName) else name


def model_configs(model: nn.Module) -> list[PreTrainedConfig]:
    """Every distinct config a module of `model` reads its implementations from: the model's config
    with its sub-configs, and each module's own `config` (an experts module of a sub-model holds its
    sub-model's)."""
    found: dict[int, PreTrainedConfig] = {}

    def add(config: object) -> None:
        if isinstance(config, PreTrainedConfig) and id(config) not in found:
            found[id(config)] = config
            for key in getattr(config, "sub_configs", None) or {}:
                add(getattr(config, key, None))

    add(getattr(model, "config", None))
    for module in model.modules():
        add(module.__dict__.get("config"))
    return list(found.values())


def implementations(configs: list[PreTrainedConfig]) -> tuple:
    """(attention, experts) implementation names of each config, in order: equal tuples mean that the
    same forwards run."""
    return tuple((getattr(c, "_attn_implementation", None), getattr(c, "_experts_implementation", None)) for c in configs)
