from harness.callbacks.base import Callback

__all__ = ["Callback"]
