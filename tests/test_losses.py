"""Batches and the default loss (lora_da/losses.py): tuple and BatchEncoding batches, samples
without labels, batches moved to the model's device."""

import pytest

import lora_da
from lora_da.models import batches, synthetic_samples, tiny_llama

from helpers import assert_equal_inits

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")


def test_tuple_and_batch_encoding_batches_match_dicts():
    from transformers import BatchEncoding

    data = list(batches(synthetic_samples(6, seed=8), 3))
    as_dicts = lora_da.initialize(tiny_llama(), data, rank=2, progress=False)
    as_tuples = lora_da.initialize(
        tiny_llama(), [(b["input_ids"], b["attention_mask"], b["labels"]) for b in data], rank=2, progress=False
    )
    as_encodings = lora_da.initialize(tiny_llama(), [BatchEncoding(b) for b in data], rank=2, progress=False)
    assert_equal_inits(as_dicts, as_tuples)
    assert_equal_inits(as_dicts, as_encodings)


def test_samples_without_labels_are_skipped_and_counted():
    samples = synthetic_samples(5, seed=9)
    samples[2]["labels"][:] = -100
    init = lora_da.initialize(tiny_llama(), list(batches(samples, 5)), rank=2, token_mask="attention", progress=False)
    assert init.num_samples == 4 and init.skipped_samples == 1


@pytest.mark.cuda
def test_batches_on_the_wrong_device_are_moved():
    model = tiny_llama().cuda()
    data = list(batches(synthetic_samples(4), 2))  # CPU tensors
    init = lora_da.initialize(model, data, rank=2, progress=False)
    assert next(iter(init.modules.values())).lora_A.is_cuda
