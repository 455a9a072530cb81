"""`vquant sweep`: run a list of configs, keep one results table (Markdown, CSV) current after
every run, plot it, and keep each run's config, quantization report and per-layer figure.

    vquant sweep paper/resnet18_w4a4 paper/resnet18_fp32 --out runs/sweep [--data.root /data/imagenet ...]
    vquant sweep configs/quickstart/*.yaml [--fail-fast] [--onnx]

Configs are files or names of shipped configs (`quickstart/*` globs among them: the YAML
files a glob matches in the current folder, else the shipped ones; a glob that matches no
YAML file is an error naming where it looked). Arguments after the configs that start with
`--` are passed to every run (LightningCLI overrides). Every config is checked, with the
overrides, before the first run (`check_configs`: parsed by the CLI's parser, its `quant` and
`data` groups built, its checkpoint looked for): when any is refused, the sweep runs
nothing and names each one with its reason. A run that fails becomes a row with its reason,
also when the CLI's parser refuses it (`--fail-fast` stops there instead). The paper's top-1
(`paper top-1`, `diff`) stands only beside a run that is the paper's experiment, its whole
setting equal to the paper config's row (`vquant_pl.cli.paper.paper_comparison`); another
run of a paper model and bit width shows `-` there, the table naming what differs. On an
unlabeled image set (the data module's `root: null`) each run is scored against its
model's float predictions on the same images: top-1/top-5 agreement, the mean KL divergence
of the float softmax to the quantized one, and the mean cosine similarity of the logits.
Under DDP (`--trainer.devices N`) every image is scored once and rank 0 alone prints and
writes; the row equals the single-process one. With `--onnx` each quantized run is also
exported (`<run>/model.onnx`) and the file scored in onnxruntime on the same test images,
every image once: its top-1/top-5 stand beside PyTorch's (`onnxruntime top-1`, `... top-5`).
A reused `--out` keeps an earlier sweep's files: new run folders get free names, and the new
table is numbered (`results_1.md`, `results_1.csv`, `accuracy_1.png`) when a table is there.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .paper import paper_comparison

COLUMNS = ["config", "model", "bits", "method", "top1", "top5", "kl", "cosine", "paper_top1", "diff", "quant_ms",
           "samples", "skipped", "scored_by", "status"]
#: With `--onnx`: the exported model's scores in onnxruntime, inserted after `top5`.
ONNX_COLUMNS = ["onnx_top1", "onnx_top5"]
ONNX_HEADERS = ["onnxruntime top-1", "onnxruntime top-5"]
HEADERS = ["config", "model", "bits", "method", "top-1", "top-5", "KL", "cosine", "paper top-1", "diff", "quant ms",
           "samples", "skipped", "scored by", "status"]


def fidelity(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """How close `logits` (quantized model) are to `reference` (float model) on the same images.

    Returns `top1` (% of images whose top-1 class is the float top-1), `top5` (% whose top-5
    holds the float top-1), `kl` (mean KL divergence of the float softmax to the quantized
    one, nats; 0 is identical) and `cosine` (mean cosine similarity of the logit vectors; 1
    is identical). Unlike agreement, KL and cosine do not hinge on a few images whose float
    prediction is itself a near tie, so they are stable on a dozen unlabeled photographs.

    Example:
        >>> x = torch.tensor([[2.0, 1.0, 0.0]])
        >>> fidelity(x, x)
        {'top1': 100.0, 'top5': 100.0, 'kl': 0.0, 'cosine': 1.0}
    """
    if reference.shape != logits.shape:
        raise ValueError(f"reference logits {tuple(reference.shape)} and logits {tuple(logits.shape)} differ in shape")
    ref, out = reference.double(), logits.double()
    target = ref.argmax(1)
    k = min(5, ref.shape[1])
    log_p, log_q = ref.log_softmax(1), out.log_softmax(1)
    return {"top1": round(100 * (out.argmax(1) == target).double().mean().item(), 2),
            "top5": round(100 * (out.topk(k, 1).indices == target[:, None]).any(1).double().mean().item(), 2),
            "kl": round(max((log_p.exp() * (log_p - log_q)).sum(1).mean().item(), 0.0), 5),
            "cosine": round(torch.nn.functional.cosine_similarity(ref, out, dim=1).mean().item(), 5)}


def _method(settings: dict) -> str:
    text = f"{settings['rounding']}/{settings['act_range'] if settings['act_bits'] else 'none'}"
    if settings["act_bits"] and settings["act_range"].startswith("aciq-") and settings.get("aciq_stats") == "bn":
        text += "(bn)"
    flags = {"equalize": "+eq", "weight_clip": "+clip", "bias_correction": "+bias-corr", "bit_allocation": "+bit-alloc",
             "act_bit_allocation": "+act-bit-alloc", "act_per_channel": "+act-per-channel"}
    text += "".join(tag for key, tag in flags.items() if settings.get(key))
    if settings.get("bn_bias_correction"):
        text += f"+bn-bias-corr({settings['bn_bias_correction']})"
    if settings.get("mixed_precision"):  # not uniform: the bits are averages
        text += f"+mixed({settings['mixed_precision']})"
    return text


def _callback(trainer):
    from ..callbacks import VQuantCallback

    return next((c for c in trainer.callbacks if isinstance(c, VQuantCallback)), None)


def _global_zero() -> bool:
    """Whether this process is rank 0 (also before Lightning's first DDP launch, from the environment)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _gathered(trainer, logits: torch.Tensor, skipped: int) -> tuple[torch.Tensor, int]:
    """Every rank's logits in dataset order, and the images skipped on all ranks together.
    A rank holds the images r, r + W, r + 2W, ... (`UnrepeatedDistributedSampler`)."""
    if trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return logits, skipped
    parts: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, (logits, skipped))
    shards, total_skipped = [p[0] for p in parts], sum(p[1] for p in parts)
    n, world = sum(len(p) for p in shards), len(shards)
    if total_skipped or any(len(p) != len(range(r, n, world)) for r, p in enumerate(shards)):
        return torch.cat(shards), total_skipped  # images skipped: rank order (the same for every pass)
    out = shards[0].new_empty((n, *shards[0].shape[1:]))
    for r, p in enumerate(shards):
        out[r::world] = p
    return out, total_skipped


def _logits(trainer, model, data, quantized: bool) -> tuple[torch.Tensor, int]:
    """The logits of a predict pass over `data` (all ranks, dataset order) and the images
    skipped; quantized or float (the callback's stages switched for the pass)."""
    cb = _callback(trainer)
    stages = cb.stages if cb is not None else None
    if cb is not None:
        cb.stages = ["predict"] if quantized else [s for s in stages if s != "predict"]
    try:
        local = torch.cat([b.float().cpu() for b in trainer.predict(model, datamodule=data)])
    finally:
        if cb is not None:
            cb.stages = stages
    return _gathered(trainer, local, data.skipped)


def _fingerprint(module: torch.nn.Module) -> str:
    """A hash of every tensor of `module`'s state_dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def float_reference_key(trainer, model, data) -> tuple:
    """What defines the float logits of a run: the model (its spec and settings, its class and
    every weight, by hash), the images (data settings and preprocessing) and the numerics
    (accelerator, precision). Two runs share a float reference only when all of it is equal."""
    hparams = sorted((k, repr(v)) for k, v in dict(getattr(model, "hparams", {})).items())
    data_hparams = sorted((k, repr(v)) for k, v in dict(data.hparams).items() if k != "preprocessing")
    return (type(model.model).__qualname__, tuple(hparams), _fingerprint(model), str(data.root),
            tuple(data_hparams), repr(data.preprocessing), type(trainer.accelerator).__name__,
            str(trainer.precision))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def onnx_scores(trainer, model, data, path: Path, reference: torch.Tensor | None = None) -> dict:
    """Export `model.model` (quantized, as just evaluated) to `path` on rank 0 and score the
    file in onnxruntime on the data module's test images, every image once (each rank its
    shard under DDP, gathered in dataset order): top-1/top-5 against the labels, or, given
    the float `reference` logits, agreement with them. A model that cannot be exported
    gives the reason in `onnx_top1`.

    Returns:
        `{"onnx_top1": float | str, "onnx_top5": float | None, "onnx_samples": int}`.
    """
    from ..export import export_onnx, ort_session, run_onnx

    reason = None
    if trainer.is_global_zero:
        try:
            first = next(iter(data.test_dataloader()), None)
            if first is None or len(first[0]) == 0:
                raise ValueError("no test image to export with")
            export_onnx(model.model, path, first[0][:2].detach().float().cpu())
        except Exception as err:  # noqa: BLE001 -- the PyTorch scores stand; the cell says why there is no file
            reason = f"not exported: {_first_line(err)}"
    # rank 0's file (under DDP the other ranks may have named their run folders differently)
    reason, path = trainer.strategy.broadcast((reason, str(path)), src=0)
    if reason is not None:
        return {"onnx_top1": reason, "onnx_top5": None, "onnx_samples": 0}
    session = ort_session(path)
    loader = data.test_dataloader()
    logits, labels = [], []
    for images, targets in loader:
        logits.append(torch.from_numpy(run_onnx(session, images)).float())
        labels.append(targets.cpu())
    if not logits:
        logits, labels = [torch.empty(0, 0)], [torch.empty(0, dtype=torch.long)]
    skipped = loader.skipped
    logits, _ = _gathered(trainer, torch.cat(logits), skipped)
    labels, _ = _gathered(trainer, torch.cat(labels), skipped)
    if reference is not None:
        if logits.shape != reference.shape:
            return {"onnx_top1": f"onnxruntime scored {len(logits)} images, the float pass {len(reference)}",
                    "onnx_top5": None, "onnx_samples": len(logits)}
        scores = fidelity(reference, logits)
        return {"onnx_top1": scores["top1"], "onnx_top5": scores["top5"], "onnx_samples": len(logits)}
    k = min(5, logits.shape[1])
    top1 = (logits.argmax(1) == labels).double().mean().item()
    top5 = (logits.topk(k, 1).indices == labels[:, None]).any(1).double().mean().item()
    return {"onnx_top1": round(100 * top1, 2), "onnx_top5": round(100 * top5, 2), "onnx_samples": len(logits)}


def _score(trainer, model, data, cb, wb, row: dict, against_float: bool, reference_cache: dict):
    """The run's PyTorch scores (added to `row`) and the float reference logits (None when scored by labels)."""
    if data.labeled and not against_float:
        result = trainer.test(model, datamodule=data, verbose=False)[0]
        row |= {"top1": round(100 * result["test/top1"], 2), "top5": round(100 * result["test/top5"], 2),
                "samples": int(result["test/samples"]), "skipped": int(result["test/skipped"]), "scored_by": "labels"}
        return row, None
    # agreement with (and distance to) the float model's logits on the same images
    key = float_reference_key(trainer, model, data)
    if key not in reference_cache:
        reference_cache[key] = _logits(trainer, model, data, quantized=False)
    reference, skipped = reference_cache[key]
    if wb is not None:
        logits, skipped = _logits(trainer, model, data, quantized=True)
        if logits.shape != reference.shape:
            raise RuntimeError(f"the quantized pass scored {len(logits)} images, the float pass {len(reference)}")
    else:
        logits = reference
    row |= fidelity(reference, logits) | {"samples": len(logits), "skipped": skipped,
                                          "scored_by": "float agreement"}
    return row, reference


def run_config(config: str | Path, overrides: list[str], reference_cache: dict, run_dir: Path | None = None,
               against_float: bool = False, onnx: bool = False) -> dict:
    """One config's run; its resolved config, `vquant_report.json` and `layers.png` go to `run_dir`.
    Scored by the labels, or, on unlabeled data or with `against_float`, against the float model.
    With `onnx`, a quantized run is exported to `run_dir / "model.onnx"` (a temporary folder
    without `run_dir`) and scored in onnxruntime on the same images (`onnx_scores`)."""
    from ..plots import available, layer_figure, save

    config = Path(config)
    if run_dir is not None:  # the user's --trainer.default_root_dir, after it, wins
        overrides = ["--trainer.default_root_dir", str(run_dir), *overrides]
    cli = _cli(config, overrides)
    writes = run_dir is not None and _global_zero()
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cli.parser.dump(cli.config, skip_none=False))
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    cb = _callback(trainer)
    settings = cb.settings if cb is not None else None
    wb = settings["weight_bits"] if settings else None
    spec = model.hparams.get("model", type(model.model).__name__)
    start = time.perf_counter()
    row: dict[str, Any] = {"config": config.stem, "model": spec}
    exporting = onnx and wb is not None
    keep = cb.keep_quantized if cb is not None else False
    if exporting:  # the model stays quantized after its pass: the file is the model just evaluated
        cb.keep_quantized = True
    try:
        row, reference = _score(trainer, model, data, cb, wb, row, against_float, reference_cache)
        if exporting:
            with contextlib.ExitStack() as stack:
                folder = run_dir if run_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
                row |= onnx_scores(trainer, model, data, folder / "model.onnx", reference)
            if isinstance(row["onnx_top1"], float) and row["onnx_samples"] != row["samples"]:
                row |= {"onnx_top1": f"onnxruntime scored {row['onnx_samples']} images, PyTorch {row['samples']}",
                        "onnx_top5": None}
    finally:
        if exporting:
            cb.keep_quantized = keep
            if not keep:
                cb.restore()
    if onnx and wb is None:
        row |= {"onnx_top1": "float run: nothing quantized to export", "onnx_top5": None}
    report = cb.report if cb is not None and wb is not None else None
    if report is not None and writes:
        (run_dir / "vquant_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        if available("layers.png"):
            save(layer_figure(report), run_dir / "layers.png")
    mixed = settings.get("mixed_precision") if settings and wb is not None else None
    hparams = dict(getattr(model, "hparams", {}))
    # the paper's number only beside the paper's experiment: every setting equal to its row's
    paper, paper_note = paper_comparison(spec, settings, pretrained=hparams.get("pretrained", True),
                                         checkpoint=hparams.get("checkpoint"),
                                         num_classes=hparams.get("num_classes", 1000),
                                         target=cb.target if cb is not None else None, data=dict(data.hparams),
                                         precision=str(trainer.precision))
    if mixed:  # the paper's rows are uniform
        paper = None
    ab = settings["act_bits"] if settings else None
    if paper_note is not None:
        row["_paper_note"] = paper_note
    return row | {
        "bits": "FP32" if wb is None else f"W{wb}A{ab if ab is not None else 'fp'}" + (" (average)" if mixed else ""),
        "method": "float" if wb is None else _method(settings),
        # the paper's top-1 is against labels: a difference only for a row scored by them
        "paper_top1": paper,
        "diff": None if paper is None or row["scored_by"] != "labels" else round(row["top1"] - paper, 2),
        "quant_ms": round(report.weight_time_s * 1e3, 1) if report else None,
        "status": "ok", "_weight_bits": wb, "_act_bits": ab if wb is not None else None,
        "_seconds": time.perf_counter() - start,
    }


def columns(rows: list[dict]) -> tuple[list[str], list[str]]:
    """The table's columns and headers: `COLUMNS`, with `ONNX_COLUMNS` after `top5` when a
    row has them (a sweep with `--onnx`)."""
    if not any("onnx_top1" in r for r in rows):
        return COLUMNS, HEADERS
    i = COLUMNS.index("top5") + 1
    return COLUMNS[:i] + ONNX_COLUMNS + COLUMNS[i:], HEADERS[:i] + ONNX_HEADERS + HEADERS[i:]


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    scores = ("top1", "top5", "onnx_top1", "onnx_top5")
    if column in scores and isinstance(value, float) and row.get("scored_by") == "float agreement":
        return f"{value} agreement"  # not a top-1 against labels
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(rows: list[dict]) -> str:
    """The results table in Markdown (missing values as `-`; a row scored against the float
    model shows its top-1/top-5 as `... agreement`; with `--onnx`, the onnxruntime columns
    after top-5, a row without their scores saying why in the cell)."""
    names, headers = columns(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for r in rows:
        cells = [_cell(r, c) for c in names]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [(r.get("config"), r["_paper_note"]) for r in rows if r.get("_paper_note")]
    if notes:  # the paper has a row for the model and bits, but the run is another experiment
        lines += ["", "paper top-1 is `-` where the run differs from the paper's row "
                      "(its config in configs/paper/, pretrained weights, no checkpoint):"]
        lines += [f"- {config}: {note}" for config, note in notes]
    return "\n".join(lines)


def table_paths(out: Path) -> tuple[Path, Path, Path]:
    """This sweep's `results.md`, `results.csv` and `accuracy.png` in `out`, numbered alike
    (`results_1.md`, `results_1.csv`, `accuracy_1.png`, ...) while any of them is taken, so an
    earlier sweep's table is never overwritten."""
    def paths(tag: str) -> tuple[Path, Path, Path]:
        return out / f"results{tag}.md", out / f"results{tag}.csv", out / f"accuracy{tag}.png"

    i = 0
    while any(p.exists() for p in paths(f"_{i}" if i else "")):
        i += 1
    return paths(f"_{i}" if i else "")


def write_results(rows: list[dict], paths: tuple[Path, Path, Path]) -> list[Path]:
    """(Re)write this sweep's table (`table_paths`): the Markdown and CSV files and, when a
    run succeeded, the figure."""
    from ..plots import available, save, sweep_figure

    md, table, figure = paths
    md.write_text(markdown(rows) + "\n")
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows)[0], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    written = [md, table]
    if any(r.get("status") == "ok" for r in rows) and available(figure.name):
        written.append(save(sweep_figure(rows), figure))
    return written


def _configs(names: list[str], parser: argparse.ArgumentParser) -> list[Path]:
    """The config files `names` stand for: files, shipped names, or globs of either. A glob
    takes the YAML files it matches from the current folder, else (none there) the shipped
    ones; a glob that matches no YAML file in either place is an error naming both."""
    from .app import configs_dir, resolve_config

    found: list[Path] = []
    for name in names:
        if glob.has_magic(name):
            pattern = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
            here = sorted(glob.glob(name))
            local = [m for m in here if m.endswith((".yaml", ".yml")) and Path(m).is_file()]
            shipped = sorted(glob.glob(str(configs_dir() / pattern)))
            matches = local or shipped
            if not matches:
                others = f" ({len(here)} match(es) there, none a .yaml/.yml file: {', '.join(here[:3])}" \
                         f"{' ...' if len(here) > 3 else ''})" if here else ""
                parser.error(f"no config matches {name}: looked for YAML files matching {name} in "
                             f"{Path.cwd()}{others} and for shipped configs matching {pattern} in {configs_dir()}")
            found += [Path(m) for m in matches]
        else:
            try:
                found.append(resolve_config(name))
            except FileNotFoundError as err:
                parser.error(str(err))
    return found


class ConfigRefused(RuntimeError):
    """The CLI's parser refused a config (with the overrides): an unknown key, a wrong type, ..."""


class _Tail:
    """A text stream that writes through to `stream` and keeps the last characters written."""

    def __init__(self, stream, keep: int = 4000):
        self.stream, self.keep, self.text = stream, keep, ""

    def write(self, text: str) -> int:
        self.text = (self.text + text)[-self.keep:]
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _parser_message(text: str) -> str:
    """The `error: ...` of a jsonargparse usage dump, on one line."""
    message = text.rsplit("error: ", 1)[1] if "error: " in text else text
    return " ".join(message.split())


def _cli(config: Path, overrides: list[str]):
    """`make_cli` for one run (parsed and instantiated); a refusal by its parser (a SystemExit
    after its usage text) is a `ConfigRefused` with the parser's message."""
    import sys

    from .app import make_cli

    tail = _Tail(sys.stderr)
    try:
        with contextlib.redirect_stderr(tail):
            return make_cli(["--config", str(config), *overrides], run=False, save_config=False)
    except SystemExit as err:
        if err.code in (0, None):
            raise ConfigRefused("the command line exited without running (an option such as --help or "
                                "--print_config is not for a sweep)") from err
        raise ConfigRefused(_parser_message(tail.text) or f"exit status {err.code}") from err


def _parser():
    """The `vquant` CLI's parser, raising `ArgumentError` instead of exiting: to check configs up front."""
    from . import app

    parser = app.make_cli([], run=False, save_config=False, parse_only=True).parser
    parser.exit_on_error = False
    return parser


def check_configs(configs: list[Path], overrides: list[str]) -> list[tuple[Path, str]]:
    """Every config (with the overrides) as each run will read it, before any run: parsed by
    the CLI's parser (unknown keys, types, choices), the `quant` group built into its callback
    (every `QuantConfig` rule) and the `data` group into its data module, the checkpoint and a
    model file looked for. Returns `(config, reason)` for each one refused (empty: all good).
    The model itself is built only by its run (it may download weights)."""
    from .._lightning import active_namespace, variant
    from ..callbacks import VQuantCallback
    from ..datamodules import ImageNetDataModule
    from ..models import SOURCES
    from .app import resolve_config_args

    namespace = active_namespace()
    parser = _parser()
    bad: list[tuple[Path, str]] = []
    for config in configs:
        try:
            cfg = parser.parse_args(resolve_config_args(["--config", str(config), *overrides]))
        except SystemExit as err:  # --help, --print_config: they print, then exit
            bad.append((config, f"the command line exited while parsing (exit status {err.code}): an option such as "
                                "--help or --print_config is not for a sweep"))
            continue
        except Exception as err:  # noqa: BLE001 -- jsonargparse's ArgumentError, a YAML error, ...
            bad.append((config, " ".join(str(err).split()) or type(err).__name__))
            continue
        reasons = []
        for group, cls in (("quant", VQuantCallback), ("data", ImageNetDataModule)):
            try:
                variant(cls, namespace)(**cfg[group].as_dict())
            except Exception as err:  # noqa: BLE001 -- each group's own checks, named
                reasons.append(f"{group}: {_first_line(err)}")
        model = cfg["model"]
        if model.get("checkpoint") is not None and not Path(model["checkpoint"]).is_file():
            reasons.append(f"model: checkpoint {model['checkpoint']} is not a file")
        spec = str(model.get("model"))
        if spec.partition(":")[0] not in SOURCES and not Path(spec).is_file():
            reasons.append(f"model: {spec} is neither a model file nor 'source:name' with source one of "
                           f"{', '.join(SOURCES)}")
        if reasons:
            bad.append((config, "; ".join(reasons)))
    return bad


def run_names(configs: list[Path], out: Path | None = None) -> list[str]:
    """One unique name per config, also its run folder under `out`: the file's stem, then with
    its folder's name (`b_x`), then numbered (`x_2`); a name whose folder already
    exists in `out` (an earlier sweep) is numbered too, so no run folder is overwritten.

    Example:
        >>> run_names([Path("c/b_x.yaml"), Path("a/x.yaml"), Path("b/x.yaml")])
        ['b_x', 'x', 'x_2']
    """
    names: list[str] = []

    def free(name: str) -> bool:
        return name not in names and (out is None or not (out / name).exists())

    for config in configs:
        parts = [p for p in (config.parent.name, config.stem) if p not in ("", ".", "..")]
        candidates = ["_".join(parts[-n:]) for n in (1, 2)]
        name = next((c for c in candidates if free(c)), None)
        i = 2
        while name is None:
            name = f"{config.stem}_{i}" if free(f"{config.stem}_{i}") else None
            i += 1
        names.append(name)
    return names


def _failed_row(config: Path, err: BaseException) -> dict:
    return {"config": config.stem, "status": f"failed: {_first_line(err)}", "_weight_bits": None}


def main(argv: list[str] | None = None) -> list[dict]:
    """`vquant sweep`; returns the rows (a failed run has `status` "failed: <reason>")."""
    parser = argparse.ArgumentParser(prog="vquant sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="config files or shipped config names (globs allowed)")
    parser.add_argument("--out", default="runs/sweep",
                        help="folder for results.md/.csv, accuracy.png and one folder per run")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    parser.add_argument("--against-float", action="store_true",
                        help="score every run against its model's float logits (agreement, KL, cosine), "
                             "also on labeled data")
    parser.add_argument("--onnx", action="store_true",
                        help="export each quantized run to <run>/model.onnx and add its top-1/top-5 in onnxruntime, "
                             "on the same test images, beside PyTorch's (needs the export extra)")
    args, overrides = parser.parse_known_args(argv)
    configs = _configs(args.configs, parser)
    if args.onnx:
        from ..export import require_onnx

        try:
            require_onnx()
        except ImportError as err:
            parser.error(f"--onnx: {err}")
    from .app import quiet_lightning

    with quiet_lightning():
        bad = check_configs(configs, overrides)  # a typo in the last config shows now, not after hours of runs
        if bad:
            parser.error(f"{len(bad)} of {len(configs)} config(s) refused, nothing was run:\n"
                         + "\n".join(f"  {config}: {reason}" for config, reason in bad))
        return _sweep(configs, overrides, Path(args.out), args.fail_fast, args.against_float, args.onnx)


def _sweep(configs: list[Path], overrides: list[str], out: Path, fail_fast: bool, against_float: bool,
           onnx: bool = False) -> list[dict]:
    zero = _global_zero()  # under DDP the other ranks run every config too, and neither print nor write

    def say(text: str) -> None:
        if zero:
            print(text, flush=True)

    def write(rows: list[dict]) -> list[Path]:
        return write_results(rows, paths) if zero else []

    if zero:
        out.mkdir(parents=True, exist_ok=True)
    names = run_names(configs, out)  # only rank 0's names are used (it alone writes)
    paths = table_paths(out)
    if paths[0].name != "results.md":
        say(f"{out} holds an earlier table, which stays; this sweep writes " + ", ".join(p.name for p in paths))
    rows: list[dict] = []
    write(rows)  # this sweep's table exists from the start
    cache: dict = {}
    for i, (config, name) in enumerate(zip(configs, names), 1):
        say(f"[{i}/{len(configs)}] {name}: running ...")
        start = time.perf_counter()
        try:
            row = run_config(config, overrides, cache, out / name, against_float, onnx)
        except KeyboardInterrupt:
            write(rows)
            say(f"interrupted; {len(rows)} finished run(s) are in {paths[0]}")
            raise
        except (Exception, SystemExit) as err:  # a failed run is a row with its reason
            row = _failed_row(config, err)
            say(f"[{i}/{len(configs)}] {name}: {row['status']} ({time.perf_counter() - start:.0f} s)")
            rows.append(row | {"config": name})
            write(rows)
            if fail_fast:
                say("stopping (--fail-fast)")
                break
            continue
        rows.append(row | {"config": name})
        write(rows)
        if row["scored_by"] == "labels":
            score = f"top-1 {row['top1']}  top-5 {row['top5']}"
        else:
            score = f"agreement {row['top1']}  top-5 agreement {row['top5']}  KL {row['kl']}  cosine {row['cosine']}"
        if "onnx_top1" in row:
            score += f"  onnxruntime: {_cell(row, 'onnx_top1')} / {_cell(row, 'onnx_top5')}"
        say(f"[{i}/{len(configs)}] {name}: {score}  "
            f"({row['samples']} images, {row['skipped']} skipped, {time.perf_counter() - start:.0f} s)")
    written = write(rows)
    say(markdown(rows))
    if written:
        say("wrote " + ", ".join(str(p) for p in written))
    return rows
