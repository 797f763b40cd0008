"""The command kept for `python -m omoe_ds.train` (`deepspeed --module omoe_ds.train`); the code is in
omoe_ds/finetune/train.py."""
from omoe_ds.finetune.train import cli

if __name__ == "__main__":
    cli()
