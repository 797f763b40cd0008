"""The command kept for `python -m omoe_ds.report`; the code is in omoe_ds/studies/report.py."""
import sys

from omoe_ds.studies.report import main

if __name__ == "__main__":
    sys.exit(main())
