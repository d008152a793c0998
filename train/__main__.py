"""``python3 -m train``: the training driver (see ``train/train_gpt.py``; settings in ``train/config.py``)."""
from .train_gpt import main

if __name__ == "__main__":
    main()
