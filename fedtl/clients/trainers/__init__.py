"""Client-side local objectives (trainers); the update rule that drives them is separate."""

from fedtl.clients.trainers.base import Trainer, batch_stream

__all__ = ["Trainer", "batch_stream"]
