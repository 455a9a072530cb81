"""vquant-pl's Lightning objects under both namespaces, `lightning.pytorch` and `pytorch_lightning`,
installed together: each Trainer gets objects of its own namespace, chosen when they are built."""
import copy
import json
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import vquant_pl as vq
from vquant_pl import _lightning

from helpers import REPO

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]

SCRIPT = """
import json, sys
import {import_line}
import torch
from torch import nn
import vquant_pl as vq

class UserModule(Base):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 1000))
        self.batches = []

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append((len(batch), tuple(x.shape), y.tolist()))

data = vq.ImageNetDataModule(root=None, image_size=32, batch_size=3, num_workers=0, limit=6)
callback = vq.VQuantCallback(8, 8, target="net", probe_shape=(4, 3, 32, 32), verbose=False)
trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[callback])
user = UserModule()
trainer.test(user, datamodule=data, verbose=False)
clf = vq.ImageClassifier(user.net)
whole = vq.VQuantCallback(8, 8, probe_shape=(4, 3, 32, 32), verbose=False)
trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[whole])
result = trainer.test(clf, datamodule=data, verbose=False)[0]
print(json.dumps({{"batches": user.batches, "samples": result["test/samples"], "layers": [callback.report.num_layers, whole.report.num_layers],
                  "namespaces": [type(o).lightning_namespace.fget(o) for o in (clf, data, callback)],
                  "imported": sorted(m for m in ("lightning", "pytorch_lightning") if m in sys.modules)}}))
"""
IMPORTS = {"lightning.pytorch": "lightning as L\nBase, Trainer = L.LightningModule, L.Trainer",
           "pytorch_lightning": "pytorch_lightning as pl\nBase, Trainer = pl.LightningModule, pl.Trainer"}


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_user_script_with_one_namespace(namespace, tmp_path):
    script = tmp_path / "user.py"
    script.write_text(SCRIPT.format(import_line=IMPORTS[namespace]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["batches"] == [[2, [3, 3, 32, 32], [-1, -1, -1]]] * 2  # ordinary (images, labels) batches
    assert got["samples"] == 6 and got["layers"] == [2, 2]
    assert got["namespaces"] == [namespace] * 3
    assert got["imported"] == [namespace.split(".")[0]]  # the other namespace is never imported


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 1000))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_both_installed_and_imported_each_trainer_works(namespace, monkeypatch, recwarn):
    ns = pytest.importorskip(namespace)
    pytest.importorskip("lightning.pytorch" if namespace == "pytorch_lightning" else "pytorch_lightning")
    monkeypatch.setenv("VQUANT_LIGHTNING", namespace)
    clf = vq.ImageClassifier(_net())
    data = vq.ImageNetDataModule(root=None, image_size=32, batch_size=4, num_workers=0, limit=6)
    callback = vq.VQuantCallback(8, 8, probe_shape=(4, 3, 32, 32), verbose=False)
    assert isinstance(clf, ns.LightningModule) and isinstance(clf, vq.ImageClassifier)
    assert isinstance(data, ns.LightningDataModule) and isinstance(callback, ns.Callback)
    trainer = ns.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    result = trainer.test(clf, datamodule=data, verbose=False)[0]
    assert result["test/samples"] == 6 and callback.report.num_layers == 2
    assert not [w for w in recwarn if "ambiguous" in str(w.message)]  # the batch size is plain to infer
    for clone in (pickle.loads(pickle.dumps(clf)), copy.deepcopy(clf)):  # ddp_spawn pickles; same namespace
        assert type(clone) is type(clf) and clone.lightning_namespace == namespace


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_load_from_checkpoint_on_the_public_classes(namespace, monkeypatch, tmp_path):
    """vq.ImageClassifier.load_from_checkpoint raised AttributeError: the public class is the
    namespace-neutral base, which has no Lightning methods."""
    ns = pytest.importorskip(namespace)
    monkeypatch.setenv("VQUANT_LIGHTNING", namespace)
    clf = vq.ImageClassifier(_net())
    data = vq.ImageNetDataModule(root=None, image_size=32, batch_size=4, num_workers=0, limit=4)
    trainer = ns.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(clf, datamodule=data, verbose=False)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    blank = _net()
    with torch.no_grad():
        for p in blank.parameters():
            p.zero_()
    back = vq.ImageClassifier.load_from_checkpoint(tmp_path / "c.ckpt", model=blank, num_classes=1000)
    assert type(back) is type(clf) and isinstance(back, ns.LightningModule)
    assert all(torch.equal(a, b) for a, b in zip(back.model.parameters(), clf.model.parameters()))
    again = vq.ImageNetDataModule.load_from_checkpoint(tmp_path / "c.ckpt")
    assert type(again) is type(data) and again.hparams.image_size == 32 and again.hparams.limit == 4


def test_namespace_is_chosen_from_the_calling_code(monkeypatch):
    import lightning
    import pytorch_lightning

    monkeypatch.delenv("VQUANT_LIGHTNING", raising=False)
    for module, expected in ((lightning, "lightning.pytorch"), (pytorch_lightning, "pytorch_lightning"),
                             (lightning.Trainer, "lightning.pytorch")):
        scope = {"__name__": "user_script", "vq": vq, "nn": nn, "imported": module}
        exec("clf = vq.ImageClassifier(nn.Linear(2, 2), num_classes=2)", scope)
        assert scope["clf"].lightning_namespace == expected
    explicit = _lightning.variant(vq.ImageClassifier, "pl")(nn.Linear(2, 2), num_classes=2)
    assert isinstance(explicit, pytorch_lightning.LightningModule) and not isinstance(explicit, lightning.LightningModule)
    with pytest.raises(ValueError, match="unknown Lightning namespace 'lightning2'"):
        _lightning.canonical("lightning2")
    monkeypatch.setenv("VQUANT_LIGHTNING", "pytorch_lightning")
    assert type(vq.ImageNetDataModule(root=None)).__mro__[1] is vq.ImageNetDataModule


def test_import_is_lazy():
    code = ("import sys, vquant_pl; print(sorted(m for m in ('lightning', 'pytorch_lightning', 'torchmetrics', "
            "'vquant_pl.classifier') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert {"ImageClassifier", "VQuantCallback", "ImageNetDataModule"} <= set(dir(vq))
