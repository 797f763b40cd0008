"""The command kept for `python -m omoe_ds.lora_pca`; the code is in omoe_ds/studies/lora_pca.py."""
import sys

from omoe_ds.studies.lora_pca import main

if __name__ == "__main__":
    sys.exit(main())
