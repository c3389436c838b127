"""`radlads ARGS`, except that every process dies right after the first mid-step checkpoint, as a
job killed there would (and deterministically, unlike a timed kill). Run it with python or torchrun."""

import os
import sys

from radlads.cli.main import main
from radlads.train.trainer import Trainer

save = Trainer._save


def save_then_die(self, state: dict) -> None:
    save(self, state)  # returns once every process has written its part and the swap is done
    if not state["complete"]:
        os._exit(0)


Trainer._save = save_then_die
sys.exit(main())
