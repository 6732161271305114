"""Each module's own tokens (lora_da/token_masks.py, the collector's counts): T5 (encoder 12 /
decoder 5 tokens, and equal lengths), a ViT classifier and a Bert pooler against a float64
per-module oracle: plain hooks that keep every module's input and output gradient, the
masks chosen here by module name from the architecture (encoder modules and cross-attention
keys/values: the encoder's attention mask; other decoder modules: labels != -100; pooler and
classifier: one row per sample; ViT: every patch), and the formulas of docs/math.md §2.
Also: per-module callables, mismatches, the warning for unmatched rows, checkpoints carrying
the counts.

Everything runs in float64, so the library and the oracle differ only in summation order:
relative errors below 1e-10 (the sums have at most a few hundred terms).
"""

import pytest
import torch
import torch.nn.functional as F

import lora_da
from lora_da.targets import find_target_modules

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:train_size not given")

TOL = 1e-10


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# -- the oracle ---------------------------------------------------------------------------------


def oracle(model, batches, names, loss_fn, mask_of):
    """G, Z, y and counts per module from plain hooks: ``mask_of(name, batch, rows)`` is the flat
    mask (float64) of that module's rows, chosen by the test. G from autograd's weight gradient."""
    modules = dict(model.named_modules())
    seen = {}

    def forward_hook(name):
        def hook(module, args, output):
            seen[name] = {"a": args[0].detach().reshape(-1, args[0].shape[-1])}
            output.register_hook(lambda g: seen[name].__setitem__("g", g.detach().reshape(-1, g.shape[-1])))

        return hook

    handles = [modules[n].register_forward_hook(forward_hook(n)) for n in names]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    sums = {n: {"Z": 0, "y": 0, "count": 0} for n in names}
    samples = 0
    try:
        for batch in batches:
            seen.clear()
            losses = loss_fn(model, batch)
            losses.sum().backward()
            samples += losses.numel()
            for n in names:
                a, g = seen[n]["a"], seen[n]["g"]
                m = mask_of(n, batch, a.shape[0]).to(torch.float64)
                assert m.numel() == a.shape[0], (n, m.shape, a.shape)
                sums[n]["Z"] = sums[n]["Z"] + (a * m[:, None]).T @ a
                sums[n]["y"] = sums[n]["y"] + (m[:, None] * g * g).sum(0)
                sums[n]["count"] += float(m.sum())
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        c = sums[n]["count"]
        out[n] = {"G": modules[n].weight.grad / samples, "Z": sums[n]["Z"] / c, "y": sums[n]["y"] / c, "count": c}
    for p in model.parameters():
        p.grad = None
    return out, samples


def assert_matches(stats, expected, samples):
    assert stats.num_samples == samples
    for name, want in expected.items():
        module = stats.modules[name]
        assert module.num_tokens == want["count"], (name, module.num_tokens, want["count"])
        assert stats.groups[module.group_index].num_tokens == want["count"], name
        assert rel(stats.input_factor(name), want["Z"]) < TOL, (name, rel(stats.input_factor(name), want["Z"]))
        assert rel(stats.output_factor_diag(name), want["y"]) < TOL, name
        assert rel(stats.gradient(name), want["G"]) < TOL, name


# -- T5 -----------------------------------------------------------------------------------------


def tiny_t5():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=48, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config).double()


def t5_batches(encoder_len, decoder_len, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(2):
        ids = torch.randint(2, 48, (3, encoder_len), generator=g)
        attention = torch.ones(3, encoder_len, dtype=torch.long)
        attention[0, encoder_len - 4 :] = 0  # right padding
        attention[2, encoder_len - 1 - b :] = 0
        labels = torch.randint(2, 48, (3, decoder_len), generator=g)
        labels[1, decoder_len - 2 :] = -100  # shorter targets
        labels[2, decoder_len - 1 :] = -100
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


def t5_loss(model, batch):
    """Each sample's mean cross-entropy of the decoder against its labels (written here, not the library's)."""
    labels = batch["labels"]
    decoder_ids = labels.clone()
    decoder_ids = torch.cat([torch.zeros_like(decoder_ids[:, :1]), decoder_ids[:, :-1]], dim=1)
    decoder_ids[decoder_ids == -100] = 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_ids).logits
    token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    valid = labels != -100
    return (token.view(labels.shape) * valid).sum(1) / valid.sum(1)


def t5_mask(name, batch, rows):
    if name.startswith("encoder.") or name.endswith("EncDecAttention.k") or name.endswith("EncDecAttention.v"):
        return batch["attention_mask"].reshape(-1)
    return (batch["labels"] != -100).reshape(-1)


@pytest.mark.parametrize("encoder_len,decoder_len", [(12, 5), (7, 7)])
def test_t5_encoder_and_decoder_modules_use_their_own_tokens(encoder_len, decoder_len):
    model = tiny_t5()
    data = t5_batches(encoder_len, decoder_len)
    modules = find_target_modules(model, None, rank=2)
    names = list(modules)
    assert any(n.startswith("decoder.") and "EncDecAttention.k" in n for n in names)
    stats = lora_da.collect_statistics(model, data, modules)  # the default loss, seq2seq-aware
    expected, samples = oracle(model, data, names, t5_loss, t5_mask)
    assert_matches(stats, expected, samples)
    # the report's count is the encoder's (the first target module's) tokens
    assert stats.num_tokens == sum(int(b["attention_mask"].sum()) for b in data)


def test_t5_fast_solve_normalizes_each_group_by_its_own_tokens():
    """The batched fast path (default solver) against the per-module reference (``eigh``),
    which divides each Z by its own group's count (KFACStatistics.input_factor): the encoder's
    and decoder's counts differ here, so a Z scaled by the pass's count differs."""
    model = tiny_t5()
    data = t5_batches(12, 5)
    fast = lora_da.initialize(model, data, rank=2, train_size=6, progress=False)
    reference = lora_da.initialize(model, data, rank=2, train_size=6, solver="eigh", progress=False)
    decoder = [n for n in fast.modules if n.startswith("decoder.")]
    assert decoder
    for name, m in fast.modules.items():
        expected = reference.modules[name].lora_B @ reference.modules[name].lora_A
        # LOBPCG's eigenpairs are checked to ~1e-8 residuals; the products agree far inside 1e-5
        assert rel(m.lora_B @ m.lora_A, expected) < 1e-5, name


def test_t5_token_mask_all_counts_each_modules_own_rows():
    model = tiny_t5()
    data = t5_batches(12, 5)
    modules = find_target_modules(model, None, rank=2)
    stats = lora_da.collect_statistics(model, data, modules, token_mask="all", loss_fn=t5_loss)

    def every_row(name, batch, rows):
        return torch.ones(rows)

    expected, samples = oracle(model, data, list(modules), t5_loss, every_row)
    assert_matches(stats, expected, samples)
    assert stats.modules["decoder.block.0.layer.0.SelfAttention.q"].num_tokens == 2 * 3 * 5
    assert stats.modules["decoder.block.0.layer.1.EncDecAttention.k"].num_tokens == 2 * 3 * 12


# -- ViT classifier -----------------------------------------------------------------------------


def tiny_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, image_size=32,
        patch_size=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTForImageClassification(config).double()


def vit_batches():
    g = torch.Generator().manual_seed(2)
    return [
        {"pixel_values": torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64),
         "labels": torch.randint(0, 3, (8,), generator=g)}
        for _ in range(2)
    ]


def classification_loss(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits, batch["labels"], reduction="none")


def test_vit_classifier_counts_one_row_per_sample_and_the_tower_its_patches():
    model = tiny_vit()
    data = vit_batches()
    modules = find_target_modules(model, None, rank=2)
    modules["classifier"] = model.classifier  # default targeting may leave the head out
    stats = lora_da.collect_statistics(model, data, modules, loss_fn=classification_loss)

    def rows_of(name, batch, rows):
        return torch.ones(rows)

    expected, samples = oracle(model, data, list(modules), classification_loss, rows_of)
    assert_matches(stats, expected, samples)
    assert stats.modules["classifier"].num_tokens == 16  # 2 batches x 8 samples
    assert stats.modules["vit.layers.0.attention.q_proj"].num_tokens == 2 * 8 * 17  # 16 patches + [CLS]


# -- Bert pooler --------------------------------------------------------------------------------


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config).double()


def bert_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(2):
        ids = torch.randint(1, 40, (4, 9), generator=g)
        attention = torch.ones(4, 9, dtype=torch.long)
        attention[1, 5:] = 0
        attention[3, 2:] = 0
        out.append({"input_ids": ids, "attention_mask": attention, "labels": torch.randint(0, 2, (4,), generator=g)})
    return out


def bert_mask(name, batch, rows):
    if name in ("bert.pooler.dense", "classifier"):
        return torch.ones(batch["input_ids"].shape[0])
    return batch["attention_mask"].reshape(-1)


def test_bert_pooler_and_classifier_count_one_row_per_sample():
    model = tiny_bert()
    data = bert_batches()
    modules = find_target_modules(model, None, rank=2)
    modules.update({"bert.pooler.dense": model.bert.pooler.dense, "classifier": model.classifier})
    stats = lora_da.collect_statistics(model, data, modules, loss_fn=classification_loss)
    expected, samples = oracle(model, data, list(modules), classification_loss, bert_mask)
    assert_matches(stats, expected, samples)
    assert stats.modules["bert.pooler.dense"].num_tokens == 8


def test_a_per_module_callable_chooses_each_modules_mask():
    model = tiny_bert()
    data = bert_batches()
    modules = {"bert.encoder.layer.0.attention.self.query": model.bert.encoder.layer[0].attention.self.query,
               "bert.pooler.dense": model.bert.pooler.dense}
    calls = []

    def token_mask(batch, name):
        calls.append(name)
        if name == "bert.pooler.dense":
            return torch.tensor([1.0, 0.0, 1.0, 1.0])  # leave sample 1 out of the pooler's Z and y
        return None  # every token of the encoder, padding too

    stats = lora_da.collect_statistics(model, data, modules, loss_fn=classification_loss, token_mask=token_mask)

    def chosen(name, batch, rows):
        return torch.tensor([1.0, 0.0, 1.0, 1.0]) if name == "bert.pooler.dense" else torch.ones(rows)

    expected, samples = oracle(model, data, list(modules), classification_loss, chosen)
    assert_matches(stats, expected, samples)
    assert sorted(set(calls)) == sorted(modules) and len(calls) == 2 * len(modules)


def test_a_per_module_mask_of_the_wrong_size_names_module_and_shapes():
    model = tiny_bert()
    modules = {"bert.pooler.dense": model.bert.pooler.dense}
    with pytest.raises(ValueError, match=r"module 'bert\.pooler\.dense' got input of shape \(4, 16\) \(4 rows\) but "
                                         r"token_mask\(batch, 'bert\.pooler\.dense'\) has shape \(4, 9\) \(36 entries\)"):
        lora_da.collect_statistics(model, bert_batches(), modules, loss_fn=classification_loss,
                                   token_mask=lambda batch, name: batch["attention_mask"])


def test_rows_that_match_no_mask_count_all_with_one_warning():
    model = tiny_vit()
    modules = find_target_modules(model, None, rank=2)
    with pytest.warns(UserWarning, match=r"12 target module\(s\) see a row count that matches no token mask "
                                         r"\(the token mask has 40 entries\): 'vit\.layers\.0\.attention\.q_proj' \(136 rows\)") as caught:
        stats = lora_da.collect_statistics(model, vit_batches(), modules, loss_fn=classification_loss,
                                           token_mask=lambda batch: torch.ones(8, 5))
    assert len([w for w in caught if "matches no token mask" in str(w.message)]) == 1
    assert stats.modules["vit.layers.0.attention.q_proj"].num_tokens == 2 * 136


def test_an_encoder_mask_that_does_not_fit_the_encoder_is_an_error():
    model = tiny_t5()
    data = t5_batches(12, 5)
    data[0]["attention_mask"] = data[0]["attention_mask"][:, :10]
    modules = find_target_modules(model, None, rank=2)
    with pytest.raises(ValueError, match=r"module 'encoder\.block\.0\.layer\.0\.SelfAttention\.q' got input of shape "
                                         r"\(3, 12, 16\) \(36 rows\) but the encoder's token mask has shape \(3, 10\)"):
        lora_da.collect_statistics(model, data, modules, loss_fn=t5_loss)


# -- checkpoints ------------------------------------------------------------------------------


def test_a_resumed_checkpoint_keeps_every_modules_count(tmp_path):
    path = str(tmp_path / "t5.ckpt")
    first = tiny_t5()
    reference = lora_da.collect_statistics(first, t5_batches(12, 5), find_target_modules(first, None, rank=2))
    model = tiny_t5()
    modules = find_target_modules(model, None, rank=2)
    lora_da.collect_statistics(model, t5_batches(12, 5), modules, max_batches=1, stats_checkpoint=path)
    resumed = lora_da.collect_statistics(model, t5_batches(12, 5), modules, stats_checkpoint=path)
    for name, want in reference.modules.items():
        assert resumed.modules[name].num_tokens == want.num_tokens, name
        assert rel(resumed.input_factor(name), reference.input_factor(name)) < TOL
        assert rel(resumed.output_factor_diag(name), reference.output_factor_diag(name)) < TOL
    assert [g.num_tokens for g in resumed.groups] == [g.num_tokens for g in reference.groups]
    assert resumed.num_tokens == reference.num_tokens
