"""The command kept for `python -m omoe_ds.export` and the documented `omoe_ds.export.load_exported`; the code
is in omoe_ds/checkpoint/export.py."""
import sys

from omoe_ds.checkpoint.export import export_checkpoint, load_exported, main

__all__ = ["export_checkpoint", "load_exported", "main"]

if __name__ == "__main__":
    sys.exit(main())
