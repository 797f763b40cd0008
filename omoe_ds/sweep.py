"""The command kept for `python -m omoe_ds.sweep`; the code is in omoe_ds/studies/sweep.py."""
import sys

from omoe_ds.studies.sweep import main

if __name__ == "__main__":
    sys.exit(main())
