"""Child process of test_checkpoint's kill test: a pass killed by SIGKILL mid-way."""

import os
import signal
import sys

import torch

import lora_da
from lora_da.models import batches, synthetic_samples, tiny_llama


def data():
    return list(batches(synthetic_samples(10, seed=21), 2))  # 5 batches


def killing_loader(kill_at: int):
    for index, batch in enumerate(data()):
        if index == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real crash
        yield batch


if __name__ == "__main__":
    path = sys.argv[1]
    lora_da.initialize(
        tiny_llama(dtype=torch.float64), killing_loader(3), rank=2, train_size=50, progress=False,
        stats_checkpoint=path, checkpoint_every=1,
    )
