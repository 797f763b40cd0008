"""The command kept for `python -m omoe_ds.small_job` and `python omoe_ds/small_job.py` (launchers that cannot
pass --module); the code is in omoe_ds/finetune/small_job.py."""
import os
import sys

if __package__ in (None, ""):  # run as a file: import as the omoe_ds package, not from omoe_ds/ itself
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
        sys.path[0] = os.path.dirname(_here)

from omoe_ds.finetune.small_job import cli  # noqa: E402

if __name__ == "__main__":
    cli()
