"""VQuantCallback: checkpoint semantics, keep_quantized, fit, precision plugins."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import vquant_pl as vq

PROBE = (4, 3, 12, 12)


class UserModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.weights_seen = []

    def forward(self, x):
        return self.net(x)

    def test_step(self, batch, batch_idx):
        self.weights_seen.append(self.net[3].weight.detach().clone())
        self.log("test/mean_logit", self(batch[0]).float().mean())

    def training_step(self, batch, batch_idx):
        return self(batch[0]).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _loader(self):
        data = torch.utils.data.TensorDataset(torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=3)

    def test_dataloader(self):
        return self._loader()

    def train_dataloader(self):
        return self._loader()


def _trainer(tmp_path, callback, **kwargs):
    return pl.Trainer(**dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                             callbacks=[callback]) | kwargs)


def _floats(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_settings_passed_win_over_the_checkpoint(tmp_path):
    module = UserModule()
    floats = _floats(module)
    trainer = _trainer(tmp_path, vq.VQuantCallback(6, 6, probe_shape=PROBE, verbose=False))
    trainer.test(module, verbose=False)
    trainer.save_checkpoint(tmp_path / "w6a6.ckpt")

    fresh = UserModule()
    callback = vq.VQuantCallback(4, 4, probe_shape=PROBE, verbose=False)
    with pytest.warns(UserWarning, match=r"other quantization settings \(weight_bits=6, act_bits=6, sigma=14.0\)"):
        _trainer(tmp_path, callback).test(fresh, ckpt_path=tmp_path / "w6a6.ckpt", verbose=False)
    assert callback.report.weight_bits == 4 and callback.report.act_bits == 4
    assert torch.equal(fresh.weights_seen[0], vq.quantize_weight(floats["net.3.weight"], 4))


def test_checkpoint_of_a_kept_quantized_model_holds_floats_and_reloads_quantized_once(tmp_path):
    module = UserModule()
    floats = _floats(module)
    callback = vq.VQuantCallback(4, 4, probe_shape=PROBE, keep_quantized=True, verbose=False)
    trainer = _trainer(tmp_path, callback)
    trainer.test(module, verbose=False)
    assert vq.is_quantized(module)
    trainer.save_checkpoint(tmp_path / "kept.ckpt")
    saved = torch.load(tmp_path / "kept.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], floats[k]) for k in floats)  # float weights on disk
    assert vq.is_quantized(module)  # saving did not change the live model

    fresh = UserModule()
    again = vq.VQuantCallback(4, 4, probe_shape=PROBE, keep_quantized=True, verbose=False)
    _trainer(tmp_path, again).test(fresh, ckpt_path=tmp_path / "kept.ckpt", verbose=False)
    expected = vq.quantize_weight(floats["net.3.weight"], 4)
    assert torch.equal(fresh.net[3].weight, expected)  # quantized once, from the floats
    assert torch.equal(fresh.eval()(torch.ones(1, 3, 12, 12)), module.eval()(torch.ones(1, 3, 12, 12)))
    vq.restore_model(fresh)
    assert [k for k in floats if not torch.equal(fresh.state_dict()[k], floats[k])] == []


def test_fit_after_keep_quantized_says_why_not(tmp_path):
    module = UserModule()
    callback = vq.VQuantCallback(4, 4, probe_shape=PROBE, keep_quantized=True, verbose=False)
    _trainer(tmp_path, callback).test(module, verbose=False)
    kept = module.net[3].weight.clone()
    with pytest.raises(RuntimeError, match="does not train .*Call callback.restore\\(\\)"):
        _trainer(tmp_path, callback, max_steps=1).fit(module)
    # the refusal changed nothing: the model is still the kept quantized one (it was restored)
    assert vq.is_quantized(module) and torch.equal(module.net[3].weight, kept)
    callback.restore()
    _trainer(tmp_path, callback, max_steps=1).fit(module)  # trains once restored
    assert not vq.is_quantized(module)


def _checkpoint_of_other_weights(tmp_path):
    """A checkpoint of another model (B): its float state and the file."""
    other = UserModule()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    trainer = _trainer(tmp_path, None, callbacks=[])
    trainer.strategy.connect(other)
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    return _floats(other), tmp_path / "other.ckpt"


def test_a_checkpoint_loaded_into_a_kept_quantized_model_is_refused_never_mixed(tmp_path):
    """keep_quantized, then trainer.test(ckpt_path=B) on the same model: Lightning loaded B's
    floats into layers still holding A's quantization; the callback said "already quantized",
    evaluated the mix, and restore() brought A's floats back (B lost)."""
    other, path = _checkpoint_of_other_weights(tmp_path)
    expected = UserModule()
    expected.load_state_dict(other)
    vq.quantize_model(expected, 4, 4, probe=vq.Probe(0, PROBE))
    x = torch.rand(2, 3, 12, 12)

    module = UserModule()
    callback = vq.VQuantCallback(4, 4, probe_shape=PROBE, keep_quantized=True, verbose=False)
    trainer = _trainer(tmp_path, callback)
    trainer.test(module, verbose=False)
    report, kept = callback.report, module.net[3].weight.clone()
    trainer.test(module, verbose=False)  # unchanged: the kept model is evaluated again, same report
    assert callback.report is report and torch.equal(module.weights_seen[-1], kept)
    module.weights_seen.clear()
    with pytest.raises(RuntimeError, match=r"net\.0\.bias, net\.0\.weight, net\.1\.bias \(and 5 more\) of UserModule "
                                           r"changed since this VQuantCallback quantized it.*callback\.restore\(\).*"
                                           r"keep_quantized=False"):
        trainer.test(module, ckpt_path=path, verbose=False)
    assert module.weights_seen == []  # the mix never ran
    callback.restore()  # what the message says: restore, then load the checkpoint again
    trainer.test(module, ckpt_path=path, verbose=False)
    assert torch.equal(module.weights_seen[0], expected.net[3].weight)
    assert torch.equal(module.eval()(x), expected.eval()(x))  # B, properly quantized
    callback.restore()
    assert [k for k in other if not torch.equal(module.state_dict()[k], other[k])] == []  # B's floats back


@pytest.mark.parametrize("bits", [8, None], ids=["w8a8", "float-baseline"])
def test_a_model_quantized_elsewhere_is_refused(tmp_path, bits):
    """A W4A4 model (vq.quantize_model, or another callback keeping it): VQuantCallback(8, 8)
    evaluated the W4A4 model with report None, and the float baseline evaluated it silently."""
    for how in ("quantize_model", "callback"):
        module = UserModule()
        if how == "quantize_model":
            vq.quantize_model(module, 4, 4, probe=vq.Probe(0, PROBE))
        else:
            first = vq.VQuantCallback(4, 4, probe_shape=PROBE, keep_quantized=True, verbose=False)
            _trainer(tmp_path, first).test(module, verbose=False)
            module.weights_seen.clear()
        w4 = module.net[3].weight.clone()
        callback = vq.VQuantCallback(bits, bits, probe_shape=PROBE, verbose=False)
        mine = r"W8A8 bn" if bits else r"a float baseline \(weight_bits=None\)"
        with pytest.raises(RuntimeError, match=rf"UserModule is quantized already \(W4A4 bn, .*this VQuantCallback's "
                                               rf"settings \({mine}\) would not apply.*vq\.restore_model\(model\)"):
            _trainer(tmp_path, callback).test(module, verbose=False)
        assert module.weights_seen == [] and callback.report is None, how
        assert vq.is_quantized(module) and torch.equal(module.net[3].weight, w4), how  # left as it was


def test_a_failed_run_restores_only_what_that_run_quantized(tmp_path):
    class Failing(UserModule):
        fail = True

        def test_step(self, batch, batch_idx):
            if self.fail:
                raise KeyError("boom")
            return super().test_step(batch, batch_idx)

    module = Failing()
    floats = _floats(module)
    callback = vq.VQuantCallback(4, 4, probe_shape=PROBE, keep_quantized=True, verbose=False)
    trainer = _trainer(tmp_path, callback)
    with pytest.raises(KeyError):
        trainer.test(module, verbose=False)  # this callback's own run failed: the floats come back
    assert not vq.is_quantized(module) and all(torch.equal(module.state_dict()[k], v) for k, v in floats.items())
    module.fail = False
    trainer.test(module, verbose=False)
    kept = module.net[3].weight.clone()
    module.fail = True
    with pytest.raises(KeyError):
        trainer.test(module, verbose=False)  # a later run of the kept model failed: it stays kept
    assert vq.is_quantized(module) and torch.equal(module.net[3].weight, kept)


def test_stages_must_name_a_stage():
    with pytest.raises(ValueError, match="stages is empty: the callback would quantize nothing"):
        vq.VQuantCallback(stages=[])


def test_a_probe_beside_probe_seed_is_refused_when_the_callback_is_built():
    with pytest.raises(ValueError, match=r"probe= is given, so probe_seed=3 would be ignored"):
        vq.VQuantCallback(probe=torch.zeros(1, 3, 8, 8), probe_seed=3)


def test_keep_quantized_under_a_spawning_strategy_is_refused_at_setup():
    """ddp_spawn: the stage runs in child processes; the parent's model came back float and
    callback.report None although keep_quantized=True."""
    spawning = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    callback = vq.VQuantCallback(4, 4, keep_quantized=True, verbose=False)
    with pytest.raises(RuntimeError, match=r"keep_quantized=True\) under strategy DDPStrategy \(spawn\): the test stage "
                                           r"runs in processes the strategy starts.*strategy='ddp'"):
        callback.setup(spawning, UserModule(), "test")
    callback.setup(spawning, UserModule(), "fit")  # not one of its stages
    vq.VQuantCallback(4, 4, verbose=False).setup(spawning, UserModule(), "test")  # not kept: fine
    script = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # rank 0 is this process
    callback.setup(script, UserModule(), "test")


@pytest.mark.parametrize("precision, double, said", [
    ("64-true", False, "precision='64-true' converts the model's weights off float32"),
    ("bf16-true", False, "precision='bf16-true' converts"),
    ("32-true", True, "net.0.weight is torch.float64"),
])
def test_export_of_a_model_that_is_not_float32_is_refused_at_setup(tmp_path, precision, double, said):
    """export= under 64-true/bf16-true failed only after quantizing and running the first batch."""
    module, path = UserModule(), tmp_path / "m.onnx"
    if double:
        module.double()
    callback = vq.VQuantCallback(4, 4, probe_shape=PROBE, export=str(path), verbose=False)
    with pytest.raises(ValueError, match=rf"export=.*float32 model, but {said}"):
        _trainer(tmp_path, callback, precision=precision).test(module, verbose=False)
    assert module.weights_seen == [] and callback.report is None and not path.exists()


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_true_precision_plugins_evaluate(tmp_path, precision):
    module = UserModule()
    callback = vq.VQuantCallback(4, 4, probe_shape=PROBE, verbose=False)
    result = _trainer(tmp_path, callback, precision=precision).test(module, verbose=False)[0]
    dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}[precision]
    assert callback.report.num_layers == 3 and module.weights_seen[0].dtype == dtype
    assert result["test/mean_logit"] == result["test/mean_logit"]  # finite, not NaN


def test_hparams_hold_the_resolved_settings():
    module = UserModule()
    callback = vq.VQuantCallback(8, 8, probe_shape=PROBE, verbose=False)
    _trainer(None, callback).test(module, verbose=False)
    hp = callback.hparams()
    assert hp["vquant/sigma"] == 25.0 and hp["vquant/probe"] == {"seed": 0, "shape": list(PROBE)}
    assert hp["vquant/probe_seed"] == 0 and hp["vquant/probe_shape"] == list(PROBE)


def test_logged_sigma_is_none_when_no_layer_used_the_sigma_rule():
    """Issue 18 item 5: `vquant/sigma` said 12.0 for an aciq-laplace run."""
    module = UserModule()
    callback = vq.VQuantCallback(4, 4, act_range="aciq-laplace", probe_shape=PROBE, verbose=False)
    _trainer(None, callback).test(module, verbose=False)
    assert callback.report.sigma_layers == [] and callback.hparams()["vquant/sigma"] is None


def test_a_reused_log_folder_keeps_every_report(tmp_path):
    """A second run into the same logger folder writes vquant_report_1.json, never over the first."""
    import json

    from pytorch_lightning.loggers import CSVLogger

    for bits in (8, 6):
        callback = vq.VQuantCallback(bits, bits, probe_shape=PROBE, verbose=False)
        logger = CSVLogger(tmp_path, name="run", version=0)
        _trainer(tmp_path, callback, logger=logger).test(UserModule(), verbose=False)
    folder = tmp_path / "run" / "version_0"
    first, second = (json.loads((folder / n).read_text()) for n in ("vquant_report.json", "vquant_report_1.json"))
    assert first["config"]["weight_bits"] == 8 and second["config"]["weight_bits"] == 6


def test_a_checkpoint_holds_floats_under_every_name_of_a_tied_tensor():
    """A layer's weight also held by another module under another attribute name (a lookup
    table tied to the output layer): the checkpoint is float under both names."""
    class Table(nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = table

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 20, bias=False)
            self.lookup = Table(self.head.weight)

        def forward(self, i):
            return self.head(self.lookup.table[i])

    model = LM()
    float_weight = model.head.weight.detach().clone()
    vq.quantize_model(model, 4, None)
    checkpoint = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    vq.VQuantCallback().on_save_checkpoint(None, model, checkpoint)
    assert set(checkpoint["state_dict"]) == {"head.weight", "lookup.table"}
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(value, float_weight), key


# -- export= -------------------------------------------------------------------------------
def _needs_onnx():
    for name in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(name, reason="the export extra is not installed")


class Scaled(nn.Module):
    """A network whose forward normalizes and scales around its quantized body."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 4))

    def forward(self, x):
        return self.body((x - 0.5) / 0.25) * 10.0


class InList(nn.Module):
    """Every quantized layer in one ModuleList, which is never called itself."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 4)])

    def forward(self, x):
        x = torch.relu(self.layers[1](torch.relu(self.layers[0](x))))
        return self.layers[2](x.mean((2, 3)))


class ExportModule(pl.LightningModule):
    """`forward` scales around `self.net` when `scale`, else passes through."""

    def __init__(self, net, scale=False):
        super().__init__()
        self.net, self.scale, self.steps = net, scale, 0

    def forward(self, x):
        return self.net(x) * 3.0 - 1.0 if self.scale else self.net(x)

    def test_step(self, batch, batch_idx):
        self.steps += 1
        self.log("test/mean", self(batch[0]).mean())

    def validation_step(self, batch, batch_idx):
        self.log("val/mean", self(batch[0]).mean())

    def _loader(self):
        data = torch.utils.data.TensorDataset(torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(1)))
        return torch.utils.data.DataLoader(data, batch_size=3)

    test_dataloader = val_dataloader = _loader


def _onnx_vs_module(path, module):
    from vquant_pl.export import ort_session, run_onnx

    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        want = module.eval()(x)
    return float((torch.from_numpy(run_onnx(ort_session(path), x)) - want).abs().max())


def _sequential():
    return UserModule().net


@pytest.mark.parametrize("net, scale, names", [
    (Scaled, False, ["body.0", "body.4"]),  # pass-through LightningModule: its network, normalization included
    (_sequential, True, ["net.0", "net.3", "net.7"]),  # the LightningModule's forward scales: the module itself
    (InList, False, ["layers.0", "layers.1", "layers.2"]),  # layers in a ModuleList: the network holding it
], ids=["network-scales", "lightning-module-scales", "module-list"])
def test_export_writes_the_evaluated_model(tmp_path, net, scale, names):
    """It wrote the smallest module holding the quantized layers: without what the forward
    around them does (and its report measured against that submodule), or nothing at all
    when they sat in a ModuleList."""
    _needs_onnx()
    module = ExportModule(net(), scale=scale)
    path = tmp_path / "m.onnx"
    callback = vq.VQuantCallback(8, 8, act_range="sigma", probe_shape=PROBE, export=str(path), keep_quantized=True,
                                 verbose=False)
    _trainer(tmp_path, callback).test(module, verbose=False)
    assert [layer.name for layer in callback.export_report.layers] == names
    assert callback.export_report.max_abs_diff < 1e-4
    assert _onnx_vs_module(path, module) < 1e-4  # the file computes what was evaluated


class DictOut(ExportModule):
    """forward returns a dict (ONNX needs one tensor out)."""

    def forward(self, x):
        return {"logits": self.net(x) * 2.0}

    def test_step(self, batch, batch_idx):
        self.log("test/mean", self(batch[0])["logits"].mean())


class ReadsTrainer(ExportModule):
    """forward reads self.trainer, which the export's copy has not."""

    def forward(self, x):
        return self.net(x) * (2.0 if self.trainer.testing else 1.0)


@pytest.mark.parametrize("module_class, warns", [(DictOut, False), (ReadsTrainer, True)])
def test_a_lightning_module_that_cannot_be_exported_gives_way_to_its_network(tmp_path, module_class, warns):
    """A LightningModule returning a dict, or reading the trainer, made the test fail at the
    first batch; the old callback exported its network."""
    _needs_onnx()
    module, path = module_class(_sequential()), tmp_path / "m.onnx"
    callback = vq.VQuantCallback(8, 8, act_range="sigma", probe_shape=PROBE, export=str(path), verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, callback).test(module, verbose=False)
    assert [layer.name for layer in callback.export_report.layers] == ["0", "3", "7"] and path.exists()
    said = [str(w.message) for w in caught if "exporting the LightningModule failed" in str(w.message)]
    assert bool(said) == warns and (not warns or "exporting its submodule 'net' instead" in said[0])


def test_export_that_cannot_find_a_module_to_export_fails_after_the_first_batch(tmp_path):
    class Direct(ExportModule):  # the step calls the layers of a ModuleList one by one
        def test_step(self, batch, batch_idx):
            self.steps += 1
            x = torch.relu(self.net.layers[1](torch.relu(self.net.layers[0](batch[0]))))
            self.log("test/mean", self.net.layers[2](x.mean((2, 3))).mean())

    _needs_onnx()
    module, path = Direct(InList()), tmp_path / "m.onnx"
    callback = vq.VQuantCallback(8, 8, probe_shape=PROBE, export=str(path), verbose=False)
    with pytest.raises(RuntimeError, match=r"tried the LightningModule \(Direct\), net \(InList\), net.layers "
                                           r"\(ModuleList\).*target="):
        _trainer(tmp_path, callback).test(module, verbose=False)
    assert module.steps == 1 and not path.exists() and not vq.is_quantized(module)
    assert all(not m._forward_hooks for m in module.modules())  # the callback's hooks are gone


def test_export_of_a_float_baseline_is_refused_when_built(tmp_path):
    with pytest.raises(ValueError, match=r"export=.*weight_bits=None"):
        vq.VQuantCallback(None, 4, export=str(tmp_path / "x.onnx"))


def test_export_happens_once_per_callback_and_never_over_a_users_file(tmp_path):
    """validate then test with one callback: the second stage raised FileExistsError on the
    callback's own file."""
    _needs_onnx()
    module, path = ExportModule(Scaled()), tmp_path / "m.onnx"
    callback = vq.VQuantCallback(8, 8, probe_shape=PROBE, stages=["validate", "test"], export=str(path),
                                 verbose=False)
    trainer = _trainer(tmp_path, callback)
    trainer.validate(module, verbose=False)
    written, report = path.read_bytes(), callback.export_report
    trainer.test(module, verbose=False)
    assert callback.report is not None and path.read_bytes() == written and callback.export_report is report

    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"user")
    with pytest.raises(FileExistsError, match="mine.onnx"):
        _trainer(tmp_path, vq.VQuantCallback(8, 8, probe_shape=PROBE, export=str(mine), verbose=False)).test(module)
    assert mine.read_bytes() == b"user" and not vq.is_quantized(module)


def test_the_kept_model_digest_reads_strided_and_meta_tensors():
    from vquant_pl.callbacks.vquant import _digests

    m = torch.nn.Module()
    m.register_buffer("expanded", torch.ones(1).expand(4))  # stride 0: no flat view of its bytes
    m.register_buffer("meta", torch.empty(3, device="meta"))
    first = _digests(m)
    assert set(first) == {"expanded", "meta"} and _digests(m) == first
    m.expanded = torch.ones(4) * 2
    assert _digests(m)["expanded"] != first["expanded"] and _digests(m)["meta"] == first["meta"]
