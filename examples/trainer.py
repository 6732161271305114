"""Fine-tune a causal LM with LoRA from a LoRA-DA init, with transformers' Trainer.

    python examples/trainer.py --model ./my-llama --data train.jsonl --out lora-out/
    python examples/trainer.py --tiny --out /tmp/lora-out      # built-in tiny random Llama

The JSONL rows are as for ``lora-da init``: ``text``, ``prompt``/``response``
or ``messages``. The first ``--calibration`` rows calibrate LoRA-DA; all rows
are trained on. The trained adapter is written to ``OUT/adapter``.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import lora_da
from lora_da.data import encode_rows, read_jsonl
from lora_da.models import collate, synthetic_samples, tiny_llama
from lora_da.peft_glue import get_peft_model_with_init


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face causal-LM directory")
    parser.add_argument("--data", help="JSONL training data")
    parser.add_argument("--tiny", action="store_true", help="built-in tiny random Llama and synthetic data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--calibration", type=int, default=256, help="samples for the LoRA-DA statistics")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    # 1. model and tokenized training samples: dicts with 1-D input_ids and labels (-100 = no loss)
    if args.tiny:
        model, pad_id = tiny_llama(), 0
        train_set = synthetic_samples(64, seed=0)
    else:
        if not (args.model and args.data):
            parser.error("--model and --data are needed unless --tiny")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = read_jsonl(args.data)
        train_set = [s.as_dict() for s in encode_rows(rows, tokenizer, max_length=args.max_length, path=args.data)]

    def data_collator(samples):
        return collate(samples, pad_token_id=pad_id)

    # 2. LoRA-DA: one forward+backward pass over a few hundred training samples
    calibration = train_set[: args.calibration]
    calibration_batches = [
        data_collator(calibration[i : i + args.batch_size]) for i in range(0, len(calibration), args.batch_size)
    ]
    init = lora_da.initialize(model, calibration_batches, rank=args.rank, train_size=len(train_set))
    print(init.summary())

    # 3. the PEFT model, starting from the init, trained as usual
    peft_model = get_peft_model_with_init(model, init, lora_alpha=args.lora_alpha, lora_dropout=0.05)
    training_args = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=2e-4,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # our samples are plain dicts of tensors
    )
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=train_set, data_collator=data_collator)
    result = trainer.train()
    print(f"final training loss {result.training_loss:.4f}")
    peft_model.save_pretrained(f"{args.out}/adapter")
    return result


if __name__ == "__main__":
    main()
