"""Peak RSS of LoRA-DA's solve phase on the SmolLM2 job's statistics, each solve in a fresh process.

    python bench/solve_memory_smollm2.py save DIR                  # one pass (32 x 256 tokens), sums to DIR
    /usr/bin/time -v python bench/solve_memory_smollm2.py solve DIR units [BUDGET_BYTES]
    /usr/bin/time -v python bench/solve_memory_smollm2.py solve DIR all   # everything prepared before solving

Prints one JSON line: the RSS before the solve (the statistics are memory-mapped, so
they count only once touched), the peak after it, and the phase times. ``all``
replaces ``solve_units`` by one unit holding every module: the structure before units.
"""
import json, os, resource, sys, time, warnings
import torch
from safetensors.torch import save_file, load_file

def rss_now():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

mode, directory = sys.argv[1], sys.argv[2]
if mode == "save":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_init_overhead import smollm2_case
    import lora_da
    from lora_da.targets import find_target_modules
    model, loader, _ = smollm2_case(32, 256)
    stats = lora_da.collect_statistics(model, loader, find_target_modules(model, None, 8))
    tensors = {f"z{i}": g.input_factor_sum for i, g in enumerate(stats.groups)}
    for n, m in stats.modules.items():
        tensors[f"g:{n}"] = m.grad_sum; tensors[f"y:{n}"] = m.output_factor_diag_sum
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{directory}/stats.safetensors")
    json.dump({"groups": [list(g.members) for g in stats.groups], "modules": {n: m.group_index for n, m in stats.modules.items()},
               "group_tokens": [g.num_tokens for g in stats.groups], "module_tokens": {n: m.num_tokens for n, m in stats.modules.items()},
               "num_tokens": stats.num_tokens, "num_samples": stats.num_samples, "num_batches": stats.num_batches},
              open(f"{directory}/meta.json", "w"))
    print("saved", stats.nbytes() / 2**20, "MiB")
    sys.exit()
from lora_da.statistics import InputGroup, KFACStatistics, ModuleStatistics
from lora_da.config import LoraDAConfig
from lora_da.methods import lora_da as method
meta = json.load(open(f"{directory}/meta.json"))
t = load_file(f"{directory}/stats.safetensors")
# each group's and module's own token count (older saves have only the pass's, which every
# group of this job shares)
group_tokens = meta.get("group_tokens", [meta["num_tokens"]] * len(meta["groups"]))
module_tokens = meta.get("module_tokens", {n: meta["num_tokens"] for n in meta["modules"]})
groups = [InputGroup(tuple(m), t[f"z{i}"], group_tokens[i]) for i, m in enumerate(meta["groups"])]
modules = {n: ModuleStatistics(n, gi, t[f"g:{n}"], t[f"y:{n}"], module_tokens[n]) for n, gi in meta["modules"].items()}
stats = KFACStatistics(modules, groups, num_samples=meta["num_samples"], num_tokens=meta["num_tokens"], num_batches=meta["num_batches"])
del t
how = sys.argv[3]
budget = int(sys.argv[4]) if len(sys.argv) > 4 else None
if how == "all" and hasattr(method, "solve_units"):
    method.solve_units = lambda context: [list(context.names)]
base_rss, base_peak = rss_now(), peak()
timings = {}
start = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from lora_da.methods.base import NoOptions, SolveContext
    ctx = SolveContext(settings=LoraDAConfig(rank=8, progress=False), options=NoOptions(), targets={}, names=list(modules),
                       statistics=stats, train_size=7473, timings=timings, **({} if budget is None else {"solve_memory_budget": budget}))
    sol = method.solve(ctx)
print(json.dumps({"how": how, "budget": budget, "statistics_MiB": round(stats.nbytes() / 2**20), "rss_before_solve_MiB": round(base_rss / 2**20),
                  "peak_before_MiB": round(base_peak / 2**20), "peak_after_MiB": round(peak() / 2**20),
                  "solve_growth_MiB": round((peak() - base_rss) / 2**20), "seconds": round(time.perf_counter() - start, 1),
                  "timings": {k: round(v, 2) for k, v in timings.items()}}))
