"""Shared pytest setup.

* Triton kernels run under the interpreter on machines without a GPU; the
  variable must be set before any ``@triton.jit`` function is defined.
* ``@pytest.mark.cuda`` tests are skipped without a CUDA device;
  ``@pytest.mark.slow`` tests are skipped unless ``--runslow`` is given.
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="module")
def data():
    """The tiny Llama's calibration batches (helpers.calibration_batches), fresh for each test file."""
    import helpers

    return helpers.calibration_batches()


@pytest.fixture(scope="module")
def llama_oracle(data):
    """(G, Z, y, W) of the float64 tiny Llama on `data` by plain autograd (helpers.llama_autograd_statistics)."""
    import helpers

    return helpers.llama_autograd_statistics(data)


# -- the command-line tests' model and data (tests/cli_helpers.py) ----------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with the tiny tokenizer, saved as a Hugging Face model directory."""
    from cli_helpers import tiny_tokenizer
    from lora_da.models import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def mixed_rows():
    from cli_helpers import make_mixed_rows

    return make_mixed_rows()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, mixed_rows):
    from cli_helpers import write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", mixed_rows)
