"""The ``lora-da`` command line (``lora_da.cli``: ``main`` and ``parser``) on a tiny Llama with a tiny
word-level tokenizer (offline), and the shared fixtures of ``tests/test_cli_*.py``; also the data
encoding, PEFT glue and report checks that use them."""

import json
import os
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lora_da
from lora_da import cli
from lora_da.data import encode_rows
from lora_da.models import tiny_llama
from lora_da.peft_glue import get_peft_model_with_init, save_as_plain_lora

WORDS = (
    "the a cat dog runs sees eats big small red blue one two three four five six seven eight nine ten "
    "and or not is are was has have how many what where who why plus minus times equals answer question "
    "apples pears boxes each gives takes left right up down more less total sum half double"
).split()
SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
RANK = 4


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= 128  # tiny_llama's vocabulary
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def mixed_rows():
    rng = random.Random(0)
    rows = []
    for i in range(12):
        kind = i % 3
        if kind == 0:
            rows.append({"text": sentence(rng, rng.randint(5, 20))})
        elif kind == 1:
            rows.append({"prompt": sentence(rng, rng.randint(3, 8)), "response": sentence(rng, rng.randint(3, 8))})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": sentence(rng, 5)},
                        {"role": "assistant", "content": sentence(rng, 4)},
                        {"role": "user", "content": sentence(rng, 3)},
                        {"role": "assistant", "content": sentence(rng, 6)},
                    ]
                }
            )
    return rows


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, mixed_rows):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", mixed_rows)


def init_args(model_dir, data, out, *extra):
    return [
        "init", "--model", model_dir, "--data", data, "--rank", str(RANK), "--samples", "12",
        "--max-length", "64", "--batch-size", "5", "--out", str(out), "--quiet", "--lora-alpha", "16", *extra,
    ]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# -- data encoding -------------------------------------------------------------------


def test_prompt_response_labels_cover_the_response_only():
    tok = tiny_tokenizer()
    [sample] = encode_rows([(1, {"prompt": "how many cats", "response": "two cats"})], tok, max_length=64)
    ids = tok("how many cats")["input_ids"]
    assert sample.input_ids.tolist()[: len(ids)] == ids
    assert sample.labels.tolist() == [-100] * len(ids) + tok("two cats", add_special_tokens=False)["input_ids"] + [2]


def test_messages_loss_on_assistant_turns_only():
    tok = tiny_tokenizer()
    row = {
        "messages": [
            {"role": "user", "content": "how many cats"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "and dogs"},
            {"role": "assistant", "content": "three dog"},
        ]
    }
    [sample] = encode_rows([(1, row)], tok, max_length=64)
    with_loss = tok.convert_ids_to_tokens([i for i, l in zip(sample.input_ids.tolist(), sample.labels.tolist()) if l != -100])
    assert with_loss == ["two", "[EOS]", "three", "dog", "[EOS]"]


# -- main and the parser ------------------------------------------------------------------


def test_argparse_errors_exit_2(capsys):
    assert cli.main(["init", "--model", "x"]) == 2
    assert cli.main(["--help"]) == 0
    assert "init" in capsys.readouterr().out


def test_defaults_come_from_the_config():
    from lora_da.config import LoraDAConfig
    from lora_da.methods import METHODS

    defaults = LoraDAConfig()
    parser = cli.build_parser()
    for argv in (["init", "--model", "m", "--data", "d.jsonl", "--out", "o"], ["demo"]):
        args = parser.parse_args(argv)
        for name in ("alpha", "beta", "gamma", "damping", "token_mask", "seed", "rank", "method"):
            assert getattr(args, name) == getattr(defaults, name), (argv[0], name)
    assert parser.parse_args(["bench", "--model", "m", "--data", "d.jsonl"]).rank == defaults.rank
    method = next(a for a in parser._subparsers._group_actions[0].choices["init"]._actions if a.dest == "method")
    assert list(method.choices) == list(METHODS)


# -- PEFT glue ----------------------------------------------------------------------------


def _tiny_loader():
    from lora_da.models import batches, synthetic_samples

    return list(batches(synthetic_samples(8, seed=5), 4))


def test_get_peft_model_with_init_matches_apply():
    loader = _tiny_loader()
    init = lora_da.initialize(tiny_llama(), loader, rank=RANK, train_size=100, progress=False)
    one_call = get_peft_model_with_init(tiny_llama(), init, lora_alpha=8, lora_dropout=0.0)
    manual = get_peft_model(tiny_llama(), LoraConfig(r=RANK, lora_alpha=8, target_modules=list(init.modules)))
    init.apply(manual)
    ids = loader[0]["input_ids"]
    assert torch.equal(logits(one_call, ids), logits(manual, ids))
    with pytest.raises(ValueError, match="comes from the LoraInit"):
        get_peft_model_with_init(tiny_llama(), init, r=2)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_preserve_output_converts_to_plain_lora_on_unmodified_base(tmp_path, use_rslora):
    loader = _tiny_loader()
    init = lora_da.initialize(tiny_llama(), loader, rank=RANK, train_size=100, preserve_output=True, progress=False)
    peft_model = get_peft_model_with_init(tiny_llama(), init, lora_alpha=8, use_rslora=use_rslora)
    ids = loader[1]["input_ids"]
    torch.testing.assert_close(logits(peft_model, ids), logits(tiny_llama(), ids), rtol=1e-4, atol=1e-5)
    # "train": move the adapter away from its init
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    trained = logits(peft_model, ids)
    assert not torch.allclose(trained, logits(tiny_llama(), ids), atol=1e-3)
    save_as_plain_lora(peft_model, init, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 * RANK
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # the *unmodified* base
    torch.testing.assert_close(logits(loaded, ids), trained, rtol=1e-4, atol=1e-4)


def test_trainer_example_runs_as_written(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "trainer.py")
    spec = importlib.util.spec_from_file_location("trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--tiny", "--out", str(tmp_path), "--max-steps", "3", "--rank", "4", "--calibration", "16"])
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert loaded.peft_config["default"].r == 4


def test_rows_whose_loss_is_cut_off_are_skipped(tmp_path):
    from lora_da.data import DataError, load_calibration_samples

    tok = tiny_tokenizer()
    long_prompt = {"prompt": " ".join(["cat"] * 40), "response": "two dog"}
    rows = [{"text": "a big cat"}, long_prompt, {"prompt": "how many", "response": "one"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    samples = load_calibration_samples(path, tok, 2, max_length=16)
    assert [s.line for s in samples] == [1, 3]
    with pytest.raises(DataError, match="has 2 usable row"):
        load_calibration_samples(path, tok, 3, max_length=16)
    assert len(load_calibration_samples(path, tok, 3, max_length=64)) == 3


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
