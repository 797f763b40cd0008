"""The command kept for `python -m omoe_ds.reshard`; the code is in omoe_ds/checkpoint/reshard.py."""
from omoe_ds.checkpoint.reshard import main, reshard

__all__ = ["main", "reshard"]

if __name__ == "__main__":
    main()
