"""What a quantization run did, layer by layer."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import QuantConfig


@dataclass
class LayerReport:
    """One quantized layer."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_bits: int
    act_bits: int | None  # None: the input stays float
    act_lo: float | None
    act_hi: float | None
    signed: bool | None
    weight_mse: float
    time_ms: float
    note: str = ""
    act_rule: str | None = None  # what ranged the input: "sigma", "bn", "aciq-laplace (BatchNorm)", "max", ...
    calls: int = 1  # calls of the layer in one forward (a shared block: more than one)
    shared_with: str | None = None  # the layer whose weight this one shares (quantized there, once)


@dataclass
class QuantReport:
    """A whole-model run: its settings (a `QuantConfig`), per-layer rows and totals."""

    config: "QuantConfig"
    backend: str
    layers: list[LayerReport] = field(default_factory=list)
    weight_time_s: float = 0.0
    probe_time_s: float = 0.0
    probe: dict | None = None  # the default probe's seed and shape, or the shape of a given one
    #: mixed_precision: the weight bits' average over `params` parameters and the input bits'
    #: over `act_elements` elements per image (the inputs inside the budget; None: not allocated)
    bit_budget: dict | None = None

    @property
    def weight_bits(self) -> int:
        return self.config.weight_bits

    @property
    def act_bits(self) -> int | None:
        return self.config.act_bits if self.config.quantizes_activations else None

    @property
    def rounding(self) -> str:
        return self.config.rounding

    @property
    def act_range(self) -> str:
        return self.config.act_range if self.config.quantizes_activations else "none"

    @property
    def sigma(self) -> float | None:
        """The sigma actually used (the paper's value when the config left it None), or None
        when no layer was ranged by the sigma rule."""
        return self.config.resolved_sigma if self.sigma_layers else None

    @property
    def sigma_layers(self) -> list[str]:
        """The layers whose input range came from the sigma rule."""
        return [r.name for r in self.layers if r.act_rule == "sigma"]

    @property
    def multi_call_layers(self) -> list[str]:
        """Layers called more than once in one forward (their input range covers every call)."""
        return [r.name for r in self.layers if r.calls > 1]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_weights(self) -> int:
        """Weight elements quantized, a weight shared by several layers counted once (as
        `bit_budget` counts parameters)."""
        return sum(math.prod(r.weight_shape) for r in self.layers if r.shared_with is None)

    def to_dict(self) -> dict:
        """Plain values (JSON-ready): the resolved settings, every layer and the totals."""
        return {"config": self.config.to_dict(resolved=True) | {"sigma": self.sigma}, "backend": self.backend,
                "probe": self.probe, "bit_budget": self.bit_budget, "weight_time_s": self.weight_time_s,
                "probe_time_s": self.probe_time_s,
                "num_layers": self.num_layers, "num_weights": self.num_weights,
                "layers": [asdict(r) for r in self.layers]}

    def table(self) -> str:
        """A readable per-layer table with a totals line."""
        head = f"{'#':>3}  {'layer':<40} {'kind':<10} {'W':>2} {'A':>2}  {'range':<22} {'w mse':>9} {'ms':>7}"
        rows = [head, "-" * len(head)]
        for i, r in enumerate(self.layers):
            act = "float" if r.act_bits is None else f"{r.act_bits}"
            rng = "" if r.act_hi is None else f"[{r.act_lo:.4g}, {r.act_hi:.4g}]"
            rows.append(f"{i:>3}  {r.name[-40:]:<40} {r.kind[:10]:<10} {r.weight_bits:>2} {act:>2}  "
                        f"{rng:<22} {r.weight_mse:>9.3g} {r.time_ms:>7.2f}" + (f"  {r.note}" if r.note else ""))
        if self.multi_call_layers:
            rows.append(f"called more than once per forward (ranges cover every call): "
                        f"{', '.join(self.multi_call_layers)}")
        if self.bit_budget is not None:
            b = self.bit_budget
            acts = ("" if b["act_average"] is None else
                    f"; input bits {b['act_average']:.4f} over {b['act_elements']:,} elements per image")
            rows.append(f"mixed precision: weight bits average {b['weight_average']:.4f} over "
                        f"{b['params']:,} parameters{acts}")
        rows.append(
            f"{self.num_layers} layers, {self.num_weights:,} weights"
            f"{' (a shared weight once)' if any(r.shared_with for r in self.layers) else ''}, W{self.weight_bits}"
            f"A{self.act_bits or 'float'} {self.rounding} on {self.backend}: weights "
            f"{self.weight_time_s * 1e3:.1f} ms, activation ranges {self.probe_time_s * 1e3:.1f} ms")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()
