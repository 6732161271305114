"""The ``lora-da`` command line (also ``python -m lora_da``).

Commands:

* ``lora-da init``  — LoRA-DA init of a Hugging Face causal LM on a JSONL file,
  written as a PEFT adapter directory plus reports (:mod:`.init`).
* ``lora-da demo``  — SmolLM2-135M-Instruct on GSM8K-style problems, offline
  (``--tiny``: a built-in tiny random Llama, no extra packages) (:mod:`.demo`).
* ``lora-da bench`` — the init's cost against one plain forward+backward pass (:mod:`.bench`).

Bad input (missing model, malformed data, an unusable ``--out``, ...) gives a
one-line error and exit code 2; ``--out`` is checked before the model is loaded
and written atomically (a temporary sibling directory swapped into place), so a
failed run leaves nothing there. Only an earlier lora-da output (its marker file
``.lora-da-output`` names every entry) is ever replaced (:mod:`.output`).

The other modules: :mod:`.parser` (options), :mod:`.errors` (:class:`UsageError`),
:mod:`.hf_model` (loading the model), :mod:`.inputs` (the data), :mod:`.output`
(the ``--out`` directory).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional, Sequence

import torch

from ..user_warnings import LoraDAWarning
from .bench import plain_pass_seconds
from .errors import UsageError
from .parser import build_parser

__all__ = ["main", "build_parser", "UsageError", "plain_pass_seconds"]


def _configure_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("lora_da")
    root.setLevel(level)
    if not any(getattr(h, "_lora_da_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lora-da: %(message)s"))
        handler._lora_da_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    for handler in root.handlers:
        if getattr(handler, "_lora_da_cli", False):
            handler.stream = sys.stderr
    if quiet:
        warnings.simplefilter("ignore", LoraDAWarning)  # --quiet: no damping summary either
        try:
            # Deferred: transformers is an optional extra (lora-da[hf]) and slow to import.
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lora-da`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit
    code: 0 done, 2 bad usage or input (one ``lora-da: error:`` line), 130 interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 2 on bad usage, 0 on --help
        return int(exit_.code or 0)
    _configure_logging(args.quiet)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except UsageError as error:
        print(f"lora-da: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-da: interrupted", file=sys.stderr)
        return 130
