"""What a quantization run did, layer by layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


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


@dataclass
class QuantReport:
    """A whole-model run: settings, per-layer rows and totals."""

    weight_bits: int
    act_bits: int | None
    rounding: str
    act_range: str
    sigma: float | None
    backend: str
    layers: list[LayerReport] = field(default_factory=list)
    weight_time_s: float = 0.0
    probe_time_s: float = 0.0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_weights(self) -> int:
        total = 0
        for layer in self.layers:
            count = 1
            for s in layer.weight_shape:
                count *= s
            total += count
        return total

    def to_dict(self) -> dict:
        return asdict(self) | {"num_layers": self.num_layers, "num_weights": self.num_weights}

    def table(self) -> str:
        """A readable per-layer table with a totals line."""
        head = f"{'#':>3}  {'layer':<40} {'kind':<10} {'W':>2} {'A':>2}  {'range':<22} {'w mse':>9} {'ms':>7}"
        rows = [head, "-" * len(head)]
        for i, r in enumerate(self.layers):
            act = "float" if r.act_bits is None else f"{r.act_bits}"
            rng = "" if r.act_hi is None else f"[{r.act_lo:.4g}, {r.act_hi:.4g}]"
            rows.append(f"{i:>3}  {r.name[-40:]:<40} {r.kind[:10]:<10} {r.weight_bits:>2} {act:>2}  "
                        f"{rng:<22} {r.weight_mse:>9.3g} {r.time_ms:>7.2f}" + (f"  {r.note}" if r.note else ""))
        rows.append(
            f"{self.num_layers} layers, {self.num_weights:,} weights, W{self.weight_bits}"
            f"A{self.act_bits or 'float'} {self.rounding} on {self.backend}: weights "
            f"{self.weight_time_s * 1e3:.1f} ms, activation ranges {self.probe_time_s * 1e3:.1f} ms")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()
