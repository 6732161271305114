"""torch.distributed on CPU (gloo), with 2 and 3 spawned processes.

Models are float64 so that only summation order differs between one process
and several: sigma and eigenvalues agree to 1e-6 relative (expect ~1e-12),
float32 factors to float32 resolution.
"""

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import lora_da
from lora_da.models import tiny_llama

import distributed_worker as worker

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, scenario: str, tmp_path, timeout_s: float = 60.0):
    """Run ``scenario`` on ``world`` ranks (process-group timeout ``timeout_s``); fail the test
    when a rank aborts or when they are not done within 3 x ``timeout_s``."""
    context = mp.start_processes(
        worker.run, args=(world, free_port(), scenario, str(tmp_path), timeout_s), nprocs=world, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 3 * timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"scenario {scenario!r} hung: still running after {3 * timeout_s:.0f} s")
    results, errors = {}, {}
    for rank in range(world):
        ok, err = tmp_path / f"rank{rank}.pt", tmp_path / f"rank{rank}.err"
        if ok.exists():
            results[rank] = torch.load(ok, weights_only=False)
        if err.exists():
            errors[rank] = err.read_text().split("\n---\n")[0]
    return results, errors


def single_process(batches, method="lora-da"):
    init = lora_da.initialize(
        tiny_llama(dtype=torch.float64), batches, rank=worker.RANK, train_size=worker.TRAIN_SIZE, progress=False,
        method=method,
    )
    return worker.summarize(init)


def assert_same_init(got, expected, names=None):
    names = names or expected["modules"].keys()
    for name in names:
        a, b, eig, sigma, c = got["modules"][name]
        ea, eb, eeig, esigma, ec = expected["modules"][name]
        assert abs(sigma - esigma) <= 1e-6 * esigma, name
        assert abs(c - ec) <= 1e-6 * ec, name
        torch.testing.assert_close(eig, eeig, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(a, ea, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, eb, rtol=1e-5, atol=1e-6)


def test_two_ranks_ddp_equal_one_process(tmp_path):
    results, errors = spawn(2, "even", tmp_path)
    assert not errors, errors
    expected = single_process(worker.union("even"))
    for rank in (0, 1):
        got = results[rank]
        assert got["num_samples"] == expected["num_samples"] and got["num_tokens"] == expected["num_tokens"]
        assert set(got["modules"]) == set(expected["modules"])
        assert_same_init(got, expected)
        assert got["backends"]["distributed"] == "torch.distributed (gloo, 2 ranks)"


def test_two_ranks_fsdp2_equal_one_process(tmp_path):
    results, errors = spawn(2, "fsdp", tmp_path)
    assert not errors, errors
    expected = single_process(worker.union("fsdp"))
    for rank in (0, 1):
        assert results[rank]["num_tokens"] == expected["num_tokens"]
        assert_same_init(results[rank], expected)


def test_three_uneven_ranks_gather_to_rank0(tmp_path):
    results, errors = spawn(3, "uneven", tmp_path)
    assert not errors, errors
    expected = single_process(worker.all_batches())
    got = results[0]
    assert got["skipped_batches"] == 1
    assert got["num_tokens"] == expected["num_tokens"] and got["num_samples"] == expected["num_samples"]
    assert set(got["modules"]) == set(expected["modules"])
    assert_same_init(got, expected)
    # the other ranks keep only what they solved themselves, and together they solved everything once
    solved = [set(results[r]["modules"]) for r in (1, 2)]
    assert not (solved[0] & solved[1]) and solved[0] | solved[1] <= set(expected["modules"])
    for rank in (1, 2):
        assert_same_init(results[rank], expected, names=results[rank]["modules"].keys())


def test_two_ranks_other_data_methods_equal_one_process(tmp_path):
    """The all-reduce serves every data method: lora-ga and fisher-subspace (G, Z, y), and cntlora,
    whose forward-only pass of one process is a full pass under torch.distributed (the same Z)."""
    results, errors = spawn(2, "methods", tmp_path)
    assert not errors, errors
    for method in worker.OTHER_METHODS:
        expected = single_process(worker.union("methods"), method=method)
        for rank in (0, 1):
            got = results[rank][method]
            assert got["num_samples"] == expected["num_samples"] and got["num_tokens"] == expected["num_tokens"]
            assert set(got["modules"]) == set(expected["modules"]), method  # every rank solves every module
            assert_same_init(got, expected)
            assert got["backends"]["distributed"] == "torch.distributed (gloo, 2 ranks)"
            assert got["backends"]["solve"] == expected["backends"]["solve"]


def test_a_rank_raising_makes_every_rank_raise_the_same(tmp_path):
    results, errors = spawn(2, "raise", tmp_path)
    assert not results
    assert set(errors) == {0, 1}
    assert errors[0] == errors[1]
    assert errors[0].startswith("DistributedError: lora-da: rank 1 failed during the statistics pass")
    assert "boom on rank 1" in errors[0]


# -- misuse: every rank raises the same DistributedError instead of aborting or hanging --------


@pytest.fixture(scope="module")
def misuse(tmp_path_factory):
    """Error text per case and rank of the "misuse" scenario (worker.MISUSE), run once for the
    tests below; a short process-group timeout, so that a hang fails fast."""
    results, errors = spawn(2, "misuse", tmp_path_factory.mktemp("misuse"), timeout_s=20)
    assert not errors and set(results) == {0, 1}, errors
    return results


def same_error_on_every_rank(results, case):
    texts = [results[rank][case] for rank in (0, 1)]
    assert texts[0] is not None and texts[0] == texts[1], texts
    assert texts[0].startswith("DistributedError: lora-da: "), texts[0]
    return texts[0]


def test_a_different_rank_per_rank_raises_on_every_rank(misuse):
    text = same_error_on_every_rank(misuse, "rank")
    assert "same arguments" in text and f"rank: {worker.RANK} on rank 0, {worker.RANK + 1} on rank 1" in text
    assert "gather_to" not in text  # only what differs is named


def test_a_different_gather_to_per_rank_raises_on_every_rank(misuse):
    text = same_error_on_every_rank(misuse, "gather_to")
    assert "gather_to: 0 on rank 0, None on rank 1" in text


def test_gather_to_outside_the_group_raises_on_every_rank(misuse):
    text = same_error_on_every_rank(misuse, "gather_to_range")
    assert "gather_to=2 is not a rank of this process group (ranks 0..1)" in text


def test_fsdp2_uneven_loader_lengths_raise_on_every_rank_before_the_pass(misuse):
    text = same_error_on_every_rank(misuse, "fsdp_lists")
    assert "same number of batches" in text and "3 on rank 0, 2 on rank 1" in text


def test_fsdp2_uneven_generators_raise_on_every_rank_when_one_runs_out(misuse):
    text = same_error_on_every_rank(misuse, "fsdp_generators")
    assert "rank(s) 1 ended after 2 batches while that of rank(s) 0 had more" in text
