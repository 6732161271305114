"""Reports of a LoraInit (lora_da.report): the bias/variance balance and the files written."""

import json


import lora_da
from lora_da.models import tiny_llama
from cli_helpers import RANK


def _tiny_loader():
    from lora_da.models import batches, synthetic_samples

    return list(batches(synthetic_samples(8, seed=5), 4))


def test_report_balance_and_files(tmp_path):
    from lora_da.report import variance_to_bias, write_report

    loader = _tiny_loader()
    for beta in (0.0, 0.5):
        init = lora_da.initialize(tiny_llama(), loader, rank=RANK, train_size=10, beta=beta, progress=False)
        ratios = [variance_to_bias(init, name) for name in init.modules]
        if beta == 0.0:  # λᵢ is then exactly the bias part −αγ‖lora_B[:, i]‖²
            assert max(abs(r) for r in ratios) < 1e-5
        else:
            assert min(ratios) > 1e-4
    paths = write_report(init, str(tmp_path), phases={"load model": 0.5})
    report = json.loads((tmp_path / "lora_da_report.json").read_text())
    assert report["phases_s"] == {"load model": 0.5}
    assert "variance_to_bias" in report["modules"]["model.layers.1.mlp.down_proj"]
    if lora_da.report.have_matplotlib():
        assert len(paths) == 3 and (tmp_path / "lora_da_report.png").stat().st_size > 10_000


def test_report_lists_the_modules_whose_damping_was_raised(tmp_path):
    import warnings

    from lora_da.models import batches, synthetic_samples
    from lora_da.report import damping_escalations, write_report

    loader = list(batches(synthetic_samples(2, min_len=8, max_len=8, seed=3), 2))  # 16 tokens < d_in; 1e-20: below float64 rounding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the summary warning (tested with the methods)
        init = lora_da.initialize(tiny_llama(), loader, rank=RANK, train_size=10, damping=1e-20, progress=False)
    write_report(init, str(tmp_path), visual=False)
    report = json.loads((tmp_path / "lora_da_report.json").read_text())
    raised = {name: m.damping for name, m in init.modules.items() if m.damping > 1e-20}
    listed = report["damping_escalations"]
    assert listed == damping_escalations(init) and set(listed) == set(raised) and len(raised) > 1
    factors = [entry["factor"] for entry in listed.values()]
    assert factors == sorted(factors, reverse=True)  # largest first
    for name, entry in listed.items():
        assert entry["damping"] == raised[name] == report["modules"][name]["damping"]
        assert entry["factor"] == raised[name] / 1e-20
        assert entry["d_in"] == init.modules[name].lora_A.shape[1] and name in entry["input_group"]
    calm = lora_da.initialize(tiny_llama(), _tiny_loader(), rank=RANK, train_size=10, progress=False)
    assert damping_escalations(calm) == {}
