"""``python3 -m train``: the training driver (see ``train/train_gpt.py``; settings in ``train/config.py``)."""
from .train_gpt import cli

if __name__ == "__main__":
    cli()
