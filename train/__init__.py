"""Training: `python -m train --config FILE [key=value ...]` (also under torchrun and srun).

The engine (and with it torch, timm, FFCV) is imported on first use, so that light submodules
such as `train.config` checks or `python -m train.tracking replay` start quickly.
"""
__all__ = ["main", "run", "REQUEUE_EXIT_CODE", "USER_ERROR_EXIT_CODE"]


def __getattr__(name: str):
    if name in __all__:
        from train import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
