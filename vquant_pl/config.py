"""`QuantConfig`: every quantization setting, its default and its check, in one place.

`quantize_model`, `VQuantCallback`, the CLI `quant:` group, the sweep and the report all
take or read this one dataclass (tests fail when one of them misses a field).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable, Literal, Optional, Sequence, get_args

#: Supported bit widths of weights and activations.
MIN_BITS, MAX_BITS = 2, 8
#: Paper sigma per activation bit width (SQuant: the same value for every model).
PAPER_SIGMA = {4: 12.0, 6: 14.0, 8: 25.0}

Rounding = Literal["nearest", "squant-e", "squant-k", "squant-c", "squant"]
ActRange = Literal["bn", "sigma", "bn-mse", "aciq-laplace", "aciq-gauss", "max", "percentile", "mse", "entropy", "none"]
BnBiasCorrection = Literal["weights", "all"]
AciqStats = Literal["probe", "bn"]
Backend = Literal["torch", "cpp", "cuda"]
BitAllocationRule = Literal["aciq", "exact"]
BiasCorrectionRule = Literal["mean", "mean-std", "paper"]
MixedPrecision = Literal["weights", "all"]


def check_bits(bits: int, what: str = "bits") -> int:
    """Return `bits` if it is an int in the supported range, else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def default_sigma(bits: int) -> float:
    """The paper's sigma for `bits`: 12 up to 5 bits, 14 for 6 and 7 bits, 25 for 8 bits.

    Example:
        >>> default_sigma(4), default_sigma(6), default_sigma(8)
        (12.0, 14.0, 25.0)
    """
    check_bits(bits, "activation bits")
    return PAPER_SIGMA[4] if bits <= 5 else PAPER_SIGMA[6] if bits <= 7 else PAPER_SIGMA[8]


def _positive(value: Any, name: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _choice(value: Any, name: str, kind: Any) -> None:
    allowed = get_args(kind)
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class QuantConfig:
    """The settings of one quantization run (docs/quantization-rules.md rules 1-7 and the methods).

    Args:
        weight_bits: bits of every quantized layer's weights (2..8), per output channel.
        act_bits: bits of the layer inputs (2..8); None keeps activations float.
        rounding: weight rounding: ``nearest``, ``squant-e``, ``squant-k``, ``squant-c`` or ``squant``.
        act_range: how each layer input is ranged: ``bn`` (DFQ, from BatchNorm, the sigma rule
            where no BatchNorm feeds a layer; the default), ``sigma`` (the SQuant rule on the
            probe; the paper), ``bn-mse`` (the range minimizing the expected error under the
            BatchNorm-derived distribution), ``aciq-laplace``/``aciq-gauss``, the data-driven
            ``max``/``percentile``/``mse``/``entropy``, or ``none``.
        sigma: the sigma rule's width; None means the paper's value for ``act_bits`` (12/14/25).
        bn_k: standard deviations of the BN range; None means the default for the bits.
        aciq_stats: where ACIQ measures the spread: ``probe`` or ``bn`` (BatchNorm statistics).
        bias_correction: ACIQ's per-channel weight bias correction after rounding.
        bit_allocation: ACIQ per-output-channel weight bits averaging ``weight_bits``.
        act_bit_allocation: per-channel activation ranges and bits from BatchNorm statistics.
        bn_bias_correction: analytic bias correction from BatchNorm statistics after
            quantization: ``weights`` (the expected output shift of the weight error; the
            default), ``all`` (also the activation quantization's), or None.
        equalize: equalize activation channel ranges into the weights before quantization.
        equalize_alpha: equalization strength in [0, 1] (0.5: DFQ's cross-layer equalization).
        equalize_k: standard deviations of the BatchNorm range that equalization balances.
        weight_clip: clamp each weight channel to its MSE-optimal range before quantization.
        percentile: the percentile of the ``percentile`` calibrator, in (0, 100].
        calib_batches: batches the data-driven methods calibrate on (None: all given).
        probe_seed: seed of the default noise probe.
        probe_shape: shape of the default probe; None means (256, C, H, W) at the model's size.
        backend: SQuant backend: None (fastest available), ``torch``, ``cpp`` or ``cuda``.
        act_per_channel: a range per input channel from BatchNorm statistics (ACIQ's ``-pcq_a``;
            implied by ``act_bit_allocation``); needs ``bn`` or ACIQ with ``aciq_stats='bn'``.
        bit_allocation_rule: ``aciq`` (the original code: std prior, only at 4 bits or fewer,
            0..8 bits, budget met approximately) or ``exact`` (ours: range prior, any bit
            width, the budget met exactly); for ``bit_allocation`` and ``act_bit_allocation``.
        bias_correction_rule: ``bias_correction``'s rule: ``mean`` (the original's ``-bcw``),
            ``mean-std`` (``-vcw -bcw``) or ``paper`` (``xi (Wq + mu)``).
        aciq_cap: keep ACIQ ranges inside the tensor's observed (probe) or known (BatchNorm:
            a ReLU6's 6) ``[min, max]`` (the original's ``clip2max``, off in its runs).
        mixed_precision: a separate, labelled recipe, not the uniform rules (``methods.bit_budget``):
            ``weights`` (per-layer weight bits from each layer's BatchNorm-derived output NSR,
            averaging exactly ``weight_bits`` by parameter count), ``all`` (also input bits,
            from the noise each input adds to the outputs, averaging exactly ``act_bits`` by
            elements per image; needs BatchNorm ranges), or None (uniform; the default). Exactly
            unless a warning says the budget could not be spent; ``report.bit_budget`` has the averages.
        mixed_min_bits: the fewest bits of a layer under ``mixed_precision`` (2..8; 3 yields to a lower average).

    Raises:
        ValueError: naming the first setting that is out of range or inconsistent.

    Example:
        >>> QuantConfig(weight_bits=6, act_bits=6).resolved_sigma
        14.0
    """

    weight_bits: int = 4
    act_bits: Optional[int] = 4
    rounding: Rounding = "squant"
    act_range: ActRange = "bn"
    sigma: Optional[float] = None
    bn_k: Optional[float] = None
    aciq_stats: AciqStats = "probe"
    bias_correction: bool = False
    bit_allocation: bool = False
    act_bit_allocation: bool = False
    bn_bias_correction: Optional[BnBiasCorrection] = "weights"
    equalize: bool = False
    equalize_alpha: float = 0.5
    equalize_k: float = 4.0
    weight_clip: bool = False
    percentile: float = 99.99
    calib_batches: Optional[int] = 8
    probe_seed: int = 0
    probe_shape: Optional[tuple[int, ...]] = None
    backend: Optional[Backend] = None
    act_per_channel: bool = False
    bit_allocation_rule: BitAllocationRule = "aciq"
    bias_correction_rule: BiasCorrectionRule = "mean"
    aciq_cap: bool = False
    mixed_precision: Optional[MixedPrecision] = None
    mixed_min_bits: int = 3

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        _choice(self.rounding, "rounding", Rounding)
        _choice(self.act_range, "act_range", ActRange)
        _choice(self.aciq_stats, "aciq_stats", AciqStats)
        if self.backend is not None:
            _choice(self.backend, "backend", Backend)
        _positive(self.sigma, "sigma")
        _positive(self.bn_k, "bn_k")
        if self.bn_bias_correction is not None:
            _choice(self.bn_bias_correction, "bn_bias_correction", BnBiasCorrection)
        _positive(self.equalize_k, "equalize_k", allow_none=False)
        if (isinstance(self.equalize_alpha, bool) or not isinstance(self.equalize_alpha, (int, float))
                or not 0 <= self.equalize_alpha <= 1):
            raise ValueError(f"equalize_alpha must be a number in [0, 1], got {self.equalize_alpha!r}")
        _choice(self.bit_allocation_rule, "bit_allocation_rule", BitAllocationRule)
        _choice(self.bias_correction_rule, "bias_correction_rule", BiasCorrectionRule)
        for name in ("bias_correction", "bit_allocation", "act_bit_allocation", "equalize", "weight_clip",
                     "act_per_channel", "aciq_cap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _positive(self.percentile, "percentile", allow_none=False)
        if self.percentile > 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.calib_batches is not None and (isinstance(self.calib_batches, bool) or
                                               not isinstance(self.calib_batches, int) or self.calib_batches < 1):
            raise ValueError(f"calib_batches must be a positive integer or None, got {self.calib_batches!r}")
        if isinstance(self.probe_seed, bool) or not isinstance(self.probe_seed, int):
            raise ValueError(f"probe_seed must be an integer, got {self.probe_seed!r}")
        if self.probe_shape is not None:
            shape = tuple(self.probe_shape)
            if len(shape) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
                raise ValueError(f"probe_shape must be a batch shape [N, ...] of positive integers, "
                                 f"got {self.probe_shape!r}")
            object.__setattr__(self, "probe_shape", shape)
        check_bits(self.mixed_min_bits, "mixed_min_bits")
        if self.mixed_precision is not None:
            _choice(self.mixed_precision, "mixed_precision", MixedPrecision)
            widths = [("weight_bits", self.weight_bits)] + ([("act_bits", self.act_bits)]
                                                             if self.mixed_precision == "all" and self.act_bits else [])
            for name, bits in widths:  # the default (3) gives way to a lower average; a value given does not
                if self.mixed_min_bits > bits and self.mixed_min_bits != _DEFAULTS["mixed_min_bits"]:
                    raise ValueError(f"mixed_min_bits={self.mixed_min_bits} is above {name}={bits}: no layer could "
                                     f"get fewer bits than the average; set mixed_min_bits to at most {bits}")
            if (self.bit_allocation or self.act_bit_allocation) and self.bit_allocation_rule == "aciq":
                raise ValueError("mixed_precision with bit_allocation / act_bit_allocation needs "
                                 "bit_allocation_rule='exact': the 'aciq' rule meets each layer's per-channel "
                                 "budget only approximately, so the averages reported would not be the ones applied")
            if self.mixed_precision == "all" and (not self.quantizes_activations or not self.ranges_from_bn):
                raise ValueError("mixed_precision='all' allocates input bits from BatchNorm statistics: it needs "
                                 "quantized activations and act_range='bn', or ACIQ with aciq_stats='bn' "
                                 f"(got act_bits={self.act_bits!r}, act_range={self.act_range!r})")
        if self.act_bit_allocation and (self.act_bits is None or not self.ranges_from_bn):
            raise ValueError("act_bit_allocation takes per-channel statistics from BatchNorm: it needs quantized "
                             "activations and act_range='bn', or 'aciq-laplace'/'aciq-gauss' with aciq_stats='bn' "
                             f"(got act_bits={self.act_bits!r}, act_range={self.act_range!r}, "
                             f"aciq_stats={self.aciq_stats!r})")
        if self.act_per_channel and (self.act_bits is None or not self.ranges_from_bn):
            raise ValueError("act_per_channel takes per-channel statistics from BatchNorm: it needs quantized "
                             "activations and act_range='bn', or 'aciq-laplace'/'aciq-gauss' with aciq_stats='bn' "
                             f"(got act_bits={self.act_bits!r}, act_range={self.act_range!r}, "
                             f"aciq_stats={self.aciq_stats!r})")
        if self.aciq_cap and not self.act_range.startswith("aciq-"):
            raise ValueError(f"aciq_cap applies to act_range 'aciq-laplace'/'aciq-gauss', got {self.act_range!r}")
        if self.bias_correction_rule != "mean" and not self.bias_correction:
            raise ValueError(f"bias_correction_rule={self.bias_correction_rule!r} needs bias_correction=True")
        if self.bit_allocation_rule != "aciq" and not (self.bit_allocation or self.act_bit_allocation):
            raise ValueError(f"bit_allocation_rule={self.bit_allocation_rule!r} needs bit_allocation or "
                             "act_bit_allocation")

        self._refuse_unread()

    def _refuse_unread(self) -> None:
        """A setting given another value than its default where no rule reads it: refused,
        never silently ignored."""
        acts = self.quantizes_activations
        quantized = "with quantized activations (act_bits set, act_range not 'none')"
        rules = (  # (setting, read by this run, what reads it)
            ("mixed_min_bits", self.mixed_precision is not None, "mixed_precision"),
            ("equalize_alpha", self.equalize, "equalize=True"),
            ("equalize_k", self.equalize, "equalize=True"),
            ("aciq_stats", acts and self.act_range.startswith("aciq-"), f"act_range 'aciq-laplace'/'aciq-gauss' {quantized}"),
            ("bn_k", acts and self.act_range == "bn", f"act_range 'bn' {quantized}"),
            ("sigma", acts and self.act_range in _SIGMA_RANGES, f"act_range {'/'.join(_SIGMA_RANGES)} {quantized}"),
            ("percentile", acts and self.act_range == "percentile", f"act_range 'percentile' {quantized}"),
            ("calib_batches", acts and self.act_range in _CALIBRATED, f"act_range {'/'.join(_CALIBRATED)} {quantized}"),
        )
        for name, read, reader in rules:
            value = getattr(self, name)
            if not read and value != _DEFAULTS[name]:
                raise ValueError(f"{name}={value!r} would be ignored: only {reader} reads it (got "
                                 f"act_bits={self.act_bits!r}, act_range={self.act_range!r}, equalize={self.equalize!r}, "
                                 f"mixed_precision={self.mixed_precision!r}); drop it (on the command line "
                                 f"--quant.{name} {_cli(_DEFAULTS[name])}) or set what reads it")

    def refuse_probe_beside(self, probe: object, given: Iterable[str] = ()) -> None:
        """A `probe` (a tensor or `Probe`) beside `probe_seed`/`probe_shape` -- set to another
        value than the default, or named in `given` (the settings a caller passed) -- would
        leave one of them ignored: a ValueError. `quantize_model` calls it with its keywords;
        a caller that holds a probe beside a config (the callback) calls it when built."""
        if probe is None:
            return
        given = set(given)
        named = [k for k in ("probe_seed", "probe_shape") if k in given or getattr(self, k) != _DEFAULTS[k]]
        if named:
            raise ValueError(f"probe= is given, so {', '.join(f'{k}={getattr(self, k)!r}' for k in named)} "
                             "would be ignored; pass either probe= or probe_seed/probe_shape")

    def without_equalize(self) -> "QuantConfig":
        """The same settings without `equalize` (its `equalize_alpha` / `equalize_k` at their defaults)."""
        return self.replace(equalize=False, equalize_alpha=_DEFAULTS["equalize_alpha"],
                            equalize_k=_DEFAULTS["equalize_k"])

    def without_activations(self) -> "QuantConfig":
        """The same weight settings with float inputs (`act_bits=None`), the settings only
        activations read back at their defaults, and mixed precision for the weights only."""
        reset = {name: _DEFAULTS[name] for name in _ACTIVATION_ONLY}
        if not self.bit_allocation:
            reset["bit_allocation_rule"] = _DEFAULTS["bit_allocation_rule"]
        mixed = "weights" if self.mixed_precision == "all" else self.mixed_precision
        return self.replace(act_bits=None, mixed_precision=mixed, **reset)

    # -- derived -----------------------------------------------------------------------
    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits is not None and self.act_range != "none"

    @property
    def ranges_from_bn(self) -> bool:
        """Ranges come from BatchNorm statistics (the probe only where none feeds a layer)."""
        return self.act_range == "bn" or (self.act_range.startswith("aciq-") and self.aciq_stats == "bn")

    @property
    def resolved_sigma(self) -> float | None:
        """`sigma`, or the paper's value for `act_bits`; None when activations stay float."""
        if not self.quantizes_activations:
            return None
        return float(self.sigma) if self.sigma is not None else default_sigma(self.act_bits)

    def replace(self, **changes: Any) -> "QuantConfig":
        """A copy with `changes` applied (checked again)."""
        return replace(self, **changes)

    def to_dict(self, resolved: bool = False) -> dict[str, Any]:
        """The fields as plain values; `resolved` fills in the sigma actually used."""
        out = asdict(self)
        if out["probe_shape"] is not None:
            out["probe_shape"] = list(out["probe_shape"])
        if resolved:
            out["sigma"] = self.resolved_sigma
        return out

    @classmethod
    def args_doc(cls, indent: str = "        ", **replacements: str) -> str:
        """The `Args:` lines of this docstring, one setting each (for the docstrings of the
        callers that take every setting); `replacements` give a setting other help text."""
        lines = (cls.__doc__ or "").split("Args:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        out: list[str] = []
        for line in lines:
            name = line.strip().split(":", 1)[0]
            if line.startswith("        ") and not line.startswith("            ") and name in replacements:
                out.append(f"{indent}{name}: {replacements[name]}")
                continue
            if line.startswith("            ") and out and out[-1].split(":", 1)[0].strip() in replacements:
                continue  # the continuation of a replaced line
            out.append(indent + line[8:] if line.startswith("        ") else line)
        return "\n".join(out)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, config: "QuantConfig | None" = None, **kwargs: Any) -> "QuantConfig":
        """`config` (or the defaults) with the given keyword settings applied; an unknown
        name is a TypeError that lists the known ones."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"unknown quantization setting(s) {unknown}; known: {', '.join(cls.field_names())}")
        if isinstance(kwargs.get("probe_shape"), Sequence):
            kwargs["probe_shape"] = tuple(kwargs["probe_shape"])
        return (config or cls()).replace(**kwargs) if kwargs else (config or cls())


_DEFAULTS = {f.name: f.default for f in fields(QuantConfig)}
#: The act_ranges that read `sigma` (the sigma rule itself, or as fallback where no BatchNorm feeds a layer).
_SIGMA_RANGES = ("sigma", "bn", "bn-mse")
#: The data-driven act_ranges, which read `calib_batches` (and `percentile`).
_CALIBRATED = ("max", "percentile", "mse", "entropy")
#: The settings only quantized activations read.
_ACTIVATION_ONLY = ("sigma", "bn_k", "aciq_stats", "percentile", "calib_batches", "act_per_channel",
                    "act_bit_allocation", "aciq_cap")


def _cli(value: Any) -> str:
    """A default as the command line writes it."""
    return "null" if value is None else str(value)
