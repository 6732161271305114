"""``method="lora"`` (lora_da/methods/lora.py): PEFT's Kaiming-uniform A and B = 0, seeded."""

import math

import torch
from torch import nn

from helpers import METHOD_RANK as RANK
from helpers import run_method as run


def test_lora_is_peft_kaiming_uniform_seeded():
    init = run("lora", None, seed=3)
    again = run("lora", None, seed=3)
    other = run("lora", None, seed=4)
    generator = torch.Generator().manual_seed(3)
    for name, m in init.modules.items():
        d_in = m.lora_A.shape[1]
        expected = torch.empty(RANK, d_in)
        nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=generator)  # modules in order, one generator
        assert torch.equal(m.lora_A, expected), name
        assert float(m.lora_A.abs().max()) <= 1 / math.sqrt(d_in)
        assert torch.count_nonzero(m.lora_B) == 0
        assert torch.equal(again.modules[name].lora_A, m.lora_A)
        assert not torch.equal(other.modules[name].lora_A, m.lora_A)
    assert not init.modifies_base_weight
