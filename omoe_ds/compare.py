"""The command kept for `python -m omoe_ds.compare`; the code is in omoe_ds/studies/compare.py."""
from omoe_ds.studies.compare import main

if __name__ == "__main__":
    main()
