"""Checkpoints: save/load with OMoE's state (state.py), resharding (reshard.py), export (export.py), and the
on-disk names they share (layout.py)."""
from .layout import CheckpointError
from .state import load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]
