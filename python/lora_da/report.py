"""Reports of a :class:`~lora_da.LoraInit`: ``lora_da_report.json`` and, when
matplotlib is installed (``pip install "lora-da[report]"``), a visual report
``lora_da_report.png`` wrapped in ``lora_da_report.html``.

The figure shows, per module type (``q_proj``, ``down_proj``, ...):

* the smallest eigenvalues of Ω, one line per layer, with the chosen rank ``r``
  marked — a clear gap between eigenvalue ``r`` and ``r+1`` means a
  well-determined subspace. Eigenvalues past ``r`` are shown when the init
  holds them (``ModuleInit.spectrum``, see :meth:`LoraInit.truncate`);
* ``σ = σ_max(Δ)`` per layer (the size of the natural-gradient step);
* the bias/variance balance per layer: on the chosen directions, the size of
  the variance term ``βcZ⁻¹`` relative to the bias term ``−αΔ̂Δ̂ᵀ``
  (:func:`variance_to_bias`);
* the wall time of each phase.

The JSON also lists the modules whose ``Z`` needed more damping than asked for
(``damping_escalations``, :func:`damping_escalations`; docs/math.md §5.1), the
detail behind the one warning ``initialize`` gives about them.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import logging
import os
from collections import defaultdict
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .naming import layer_index, module_type

if TYPE_CHECKING:  # pragma: no cover - annotations only: result imports nothing from here
    from .result import LoraInit

logger = logging.getLogger(__name__)

JSON_NAME = "lora_da_report.json"
PNG_NAME = "lora_da_report.png"
HTML_NAME = "lora_da_report.html"

def _by_type(init: "LoraInit") -> Dict[str, List[Tuple[int, str]]]:
    groups: Dict[str, List[Tuple[int, str]]] = defaultdict(list)
    for name in init.modules:
        groups[module_type(name)].append((layer_index(name), name))
    return {kind: sorted(members) for kind, members in groups.items()}


def variance_to_bias(init: "LoraInit", name: str) -> float:
    """Size of Ω's variance term relative to its bias term on the chosen subspace.

    For each chosen eigenvector ``aᵢ`` (``λᵢ = aᵢᵀΩaᵢ``) the bias part is
    ``−α‖Δ̂ᵀaᵢ‖² = −αγ‖lora_B[:, i]‖²`` (as ``B₀ = A₀ᵀΔ̂``) and the variance part
    ``βc·aᵢᵀZ⁻¹aᵢ = λᵢ − bias``. Returns ``Σ variance / Σ |bias|`` over the ``r``
    directions: ≪ 1 means the init is driven by the gradient (bias) term.
    """
    m = init.modules[name]
    cfg = init.config
    bias = -cfg.alpha * cfg.gamma * m.lora_B.double().pow(2).sum(dim=0)
    values = m.eigenvalues.double()[: bias.numel()]
    if values.numel() != bias.numel():  # no eigenvalues (e.g. an expert given the lora fallback)
        return float("nan")
    variance = values - bias
    total_bias = float(bias.abs().sum())
    return float(variance.sum()) / total_bias if total_bias > 0 else float("nan")


def damping_escalations(init: "LoraInit") -> Dict[str, dict]:
    """The modules whose damping was raised above ``init.config.damping`` by the
    escalation rule (docs/math.md §5.1), largest factor first:
    ``{name: {"damping": λ used, "factor": λ used / λ asked, "d_in": ..., "input_group": [...]}}``.
    Empty for methods that do not damp ``Z``."""
    requested = init.config.damping
    raised = [(m.damping / requested, name) for name, m in init.modules.items() if m.damping > requested]
    raised.sort(key=lambda item: -item[0])
    return {
        name: {
            "damping": init.modules[name].damping,
            "factor": factor,
            "d_in": int(init.modules[name].lora_A.shape[1]),
            "input_group": list(init.modules[name].input_group),
        }
        for factor, name in raised
    }


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def figure(init: "LoraInit", phases: Optional[Dict[str, float]] = None, title: Optional[str] = None):
    """The report's matplotlib figure (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import cm

    groups = _by_type(init)
    kinds = list(groups)
    rank = init.config.rank
    ncols = 4
    eig_rows = max(1, -(-len(kinds) // ncols))
    fig = plt.figure(figsize=(4.2 * ncols, 3.2 * (eig_rows + 1) + 0.6), layout="constrained")
    grid = fig.add_gridspec(eig_rows + 1, ncols)
    colormap = matplotlib.colormaps["viridis"]

    for index, kind in enumerate(kinds):
        ax = fig.add_subplot(grid[index // ncols, index % ncols])
        members = groups[kind]
        layers = [layer for layer, _ in members]
        low, high = min(layers), max(layers)
        for layer, name in members:
            m = init.modules[name]
            values = m.spectrum if m.spectrum is not None else m.eigenvalues
            values = [float(v) for v in values]
            shade = 0.5 if high == low else (layer - low) / (high - low)
            ax.plot(range(1, len(values) + 1), values, marker=".", lw=0.8, ms=3, color=colormap(shade), alpha=0.8)
        ax.axvline(rank + 0.5, color="crimson", ls="--", lw=1)
        ax.text(rank + 0.5, 0.04, f" r={rank}", color="crimson", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
        ax.set_title(f"{kind}: smallest eigenvalues of Ω", fontsize=9)
        ax.set_xlabel("index i (ascending)", fontsize=8)
        ax.set_ylabel("λ_i(Ω)", fontsize=8)
        ax.tick_params(labelsize=7)
        if high > low:
            mappable = cm.ScalarMappable(cmap=colormap, norm=matplotlib.colors.Normalize(low, high))
            fig.colorbar(mappable, ax=ax, label="layer", pad=0.01, fraction=0.05).ax.tick_params(labelsize=7)

    bottom = eig_rows
    ax_sigma = fig.add_subplot(grid[bottom, 0:2])
    ax_balance = fig.add_subplot(grid[bottom, 2])
    ax_time = fig.add_subplot(grid[bottom, 3])
    for kind in kinds:
        layers = [layer for layer, _ in groups[kind]]
        ax_sigma.plot(layers, [init.modules[n].sigma for _, n in groups[kind]], marker="o", ms=3, lw=1, label=kind)
        balance = [variance_to_bias(init, n) for _, n in groups[kind]]
        ax_balance.plot(layers, balance, marker="o", ms=3, lw=1, label=kind)
    ax_sigma.set_yscale("log")
    ax_sigma.set_title("σ = σ_max(Δ) per layer (natural-gradient step size)", fontsize=9)
    ax_sigma.set_xlabel("layer", fontsize=8)
    ax_sigma.legend(fontsize=7, ncol=2)
    ax_sigma.tick_params(labelsize=7)
    ax_balance.set_yscale("symlog", linthresh=1e-3)
    ax_balance.set_title("variance / |bias| term of Ω on the chosen r directions", fontsize=9)
    ax_balance.set_xlabel("layer", fontsize=8)
    ax_balance.tick_params(labelsize=7)

    timings = dict(phases) if phases else {}
    if not timings:
        timings = {phase: seconds for phase, seconds in init.timings.items() if phase != "total"}
    names = list(timings)
    bars = ax_time.barh(names, [timings[n] for n in names], color="steelblue")
    ax_time.bar_label(bars, labels=[f"{timings[n]:.2f}s" for n in names], fontsize=7, padding=2)
    ax_time.invert_yaxis()
    ax_time.set_title("wall time per phase", fontsize=9)
    ax_time.set_xlabel("seconds", fontsize=8)
    ax_time.tick_params(labelsize=7)
    ax_time.margins(x=0.3)

    head = title or "LoRA-DA initialization"
    fig.suptitle(
        f"{head} — {len(init.modules)} modules, r={rank}, α={init.config.alpha:g}, β={init.config.beta:g}, "
        f"γ={init.config.gamma:g}, N={init.train_size}, {init.num_samples} samples / {init.num_tokens} tokens",
        fontsize=10,
    )
    return fig


def write_report(
    init: "LoraInit",
    directory: str,
    *,
    extra: Optional[dict] = None,
    phases: Optional[Dict[str, float]] = None,
    title: Optional[str] = None,
    visual: bool = True,
) -> List[str]:
    """Write ``lora_da_report.json`` (``init.report()`` plus ``extra``) and, when
    matplotlib is installed and ``visual``, ``lora_da_report.png`` and
    ``lora_da_report.html``. ``phases``: extra wall times to chart (e.g. model
    loading). Returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    report = init.report()
    if phases:
        report["phases_s"] = dict(phases)
    for name, entry in report.get("modules", {}).items():
        entry["variance_to_bias"] = variance_to_bias(init, name)
    escalated = damping_escalations(init)
    report["damping_escalations"] = escalated
    if extra:
        report.update(extra)
    paths = [os.path.join(directory, JSON_NAME)]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2)
    if not visual:
        return paths
    if not have_matplotlib():
        logger.info('matplotlib is not installed: no visual report (pip install "lora-da[report]")')
        return paths
    import matplotlib.pyplot as plt

    fig = figure(init, phases=phases, title=title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    png = buffer.getvalue()
    png_path = os.path.join(directory, PNG_NAME)
    with open(png_path, "wb") as f:
        f.write(png)
    html_path = os.path.join(directory, HTML_NAME)
    with open(html_path, "w") as f:
        f.write(
            "<!doctype html><meta charset='utf-8'><title>LoRA-DA report</title>"
            "<style>body{font-family:sans-serif;margin:1.5em} pre{background:#f4f4f4;padding:.8em}</style>"
            f"<h1>{html.escape(title or 'LoRA-DA initialization')}</h1>"
            f"<pre>{html.escape(init.summary())}</pre>"
            f"{_escalation_note(init, escalated)}"
            f"<img style='max-width:100%' alt='LoRA-DA report' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<p>Numbers: <a href='{JSON_NAME}'>{JSON_NAME}</a>.</p>"
        )
    paths += [png_path, html_path]
    return paths


def _escalation_note(init: "LoraInit", escalated: Dict[str, dict]) -> str:
    """An HTML paragraph naming the modules whose damping was raised ('' when none)."""
    if not escalated:
        return ""
    items = ", ".join(f"{html.escape(name)} ×{entry['factor']:.3g}" for name, entry in escalated.items())
    return (
        f"<p>Damping raised above {init.config.damping:g} (docs/math.md §5.1) for "
        f"{len(escalated)} modules, largest factor first: {items}.</p>"
    )
