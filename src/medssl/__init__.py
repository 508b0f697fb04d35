"""medssl: self-supervised pretraining of medical image encoders (2D and 3D) and honest low-label evaluation.

Library first::

    import medssl
    run = medssl.pretrain(method="mocov2", data="phantom2d", out="runs/moco", max_steps=200)
    table = medssl.evaluate(run=run, data="phantom2d", protocol="linear", out="runs/moco/eval")
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing medssl must not import torch
    if name in ("pretrain", "evaluate"):
        from medssl import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["__version__", "pretrain", "evaluate"]
