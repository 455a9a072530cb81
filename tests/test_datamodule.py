"""ImageNetDataModule: layouts, labels, and bad input named before any work."""
import pytest
import torch
from PIL import Image

from vquant_pl.datamodules import ImageNetDataModule, image_suffixes, imagenet_synsets
from vquant_pl.datamodules.imagenet import ImageFiles, collate_skipping, scan
from vquant_pl.models import Preprocessing

SYN = imagenet_synsets()


def _jpeg(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()).save(path, "JPEG")
    return path


def test_class_list_is_imagenet_1k_order():
    assert len(SYN) == 1000 and SYN[0] == "n01440764" and SYN[999] == "n15075141" and SYN == sorted(SYN)


def test_folder_layout_with_some_synsets_gets_true_indices(tmp_path):
    for i, s in enumerate([SYN[0], SYN[1], SYN[999]]):
        _jpeg(tmp_path / "val" / s / f"img{i}.JPEG", i)
    dm = ImageNetDataModule(tmp_path, image_size=32, batch_size=2, num_workers=0)
    dm.setup("test")
    assert [label for _, label in dm.dataset.samples] == [0, 1, 999]
    batch = next(iter(dm.test_dataloader()))
    images, labels = batch  # an ordinary (images, labels) batch
    assert len(batch) == 2 and images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    assert dm.skipped == 0


def test_flat_layouts(tmp_path):
    files = [_jpeg(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", i) for i in range(1, 4)]
    devkit = [SYN[5], SYN[3], SYN[7]] + [s for s in SYN if s not in (SYN[5], SYN[3], SYN[7])]
    (tmp_path / "synsets.txt").write_text("\n".join(devkit))
    (tmp_path / "gt.txt").write_text("2\n1\n3\n")  # ILSVRC2012 IDs, 1-based, devkit order
    official = scan(tmp_path / "val", tmp_path / "gt.txt", tmp_path / "synsets.txt")
    assert [label for _, label in official] == [3, 5, 7]
    (tmp_path / "labels.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{f.stem},{SYN[9 - i]} 1 2 3 4\n" for i, f in enumerate(files)))
    assert [label for _, label in scan(tmp_path / "val", tmp_path / "labels.csv")] == [9, 8, 7]
    (tmp_path / "labels.txt").write_text("".join(f"{f.name} {i + 10}\n" for i, f in enumerate(files)))
    assert [label for _, label in scan(tmp_path / "val", tmp_path / "labels.txt")] == [10, 11, 12]
    named = tmp_path / "named"
    _jpeg(named / f"{SYN[42]}_dog.JPEG")
    assert scan(named) == [(named / f"{SYN[42]}_dog.JPEG", 42)]


def test_bad_roots_and_labels_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageNet root .*nowhere not found"):
        ImageNetDataModule(tmp_path / "nowhere").setup()
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images .* found in .*empty/val"):
        ImageNetDataModule(tmp_path / "empty").setup()
    _jpeg(tmp_path / "odd" / "val" / "cats" / "a.JPEG")
    _jpeg(tmp_path / "odd" / "val" / SYN[0] / "b.JPEG")
    with pytest.raises(ValueError, match="1 folder\\(s\\) that are not ImageNet-1k synsets: cats"):
        ImageNetDataModule(tmp_path / "odd").setup()
    for i in range(3):
        _jpeg(tmp_path / "flat" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "gt.txt").write_text("1\n2\n")
    with pytest.raises(ValueError, match="labels file .*gt.txt has 2 lines but .* holds 3 images"):
        ImageNetDataModule(tmp_path / "flat", labels_file=tmp_path / "gt.txt", synsets_file=tmp_path / "gt.txt").setup()
    with pytest.raises(ValueError, match="flat layout; pass labels_file="):
        ImageNetDataModule(tmp_path / "flat").setup()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ImageNetDataModule(tmp_path, batch_size=0)


def test_corrupt_jpeg_is_named_or_skipped_and_counted(tmp_path):
    good = _jpeg(tmp_path / SYN[0] / "good.JPEG")
    bad = tmp_path / SYN[1] / "bad.JPEG"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[:200])  # truncated
    samples = scan(tmp_path)
    strict = ImageFiles(samples, lambda im: torch.zeros(1))
    with pytest.raises(RuntimeError, match="cannot decode image .*bad.JPEG"):
        [strict[i] for i in range(len(strict))]
    lenient = ImageFiles(samples, lambda im: torch.zeros(1), skip_corrupt=True)
    images, labels, skipped = collate_skipping([lenient[i] for i in range(len(lenient))])
    assert labels.tolist() == [0] and skipped == 1
    dm = ImageNetDataModule(tmp_path, image_size=16, batch_size=1, num_workers=0, skip_corrupt=True)
    batches = list(dm.test_dataloader())  # the bad image's batch is dropped, not reshaped
    assert [len(b) for b in batches] == [2] and batches[0][1].tolist() == [0] and dm.skipped == 1
    list(dm.test_dataloader())
    assert dm.skipped == 1  # counted per pass, not accumulated


def test_mixed_layout_is_an_error_naming_both(tmp_path):
    _jpeg(tmp_path / "val" / SYN[0] / "a.JPEG")
    _jpeg(tmp_path / "val" / f"{SYN[1]}_x.JPEG")
    with pytest.raises(ValueError, match=rf"val mixes two layouts: 1 class folder\(s\) \({SYN[0]}/\) and "
                                         rf"1 loose image\(s\) \({SYN[1]}_x.JPEG\)"):
        ImageNetDataModule(tmp_path).setup()


def test_raster_formats_are_listed(tmp_path):
    assert {".jpeg", ".jpg", ".png", ".webp", ".bmp", ".tif", ".gif", ".ppm"} <= image_suffixes()
    image = Image.fromarray((torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    for i, (suffix, fmt) in enumerate([(".webp", "WEBP"), (".bmp", "BMP"), (".JPEG", "JPEG")]):
        image.save(tmp_path / f"{SYN[i]}_img{suffix}", fmt)
    image.save(tmp_path / f"{SYN[3]}_png_named.JPEG", "PNG")  # the content decides, within raster formats
    assert [label for _, label in scan(tmp_path)] == [0, 1, 2, 3]
    assert ImageFiles(scan(tmp_path), lambda im: im.size)[3] == ((24, 20), 3)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n%%EOF\n"


def test_postscript_is_never_opened(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    rendered = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", lambda self, *a, **k: rendered.append(self))
    assert not {".eps", ".ps", ".epsf", ".epsi", ".pdf"} & image_suffixes()
    _jpeg(tmp_path / f"{SYN[0]}_photo.JPEG")
    (tmp_path / f"{SYN[1]}_figure.eps").write_bytes(EPS)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden: not looked at
    with pytest.warns(UserWarning, match=r"left out 2 file\(s\) that are not raster images \(.*figure.eps.*; "
                                         r"suffixes .eps, .txt\)"):
        samples = scan(tmp_path)
    assert [p.name for p, _ in samples] == [f"{SYN[0]}_photo.JPEG"]
    disguised = tmp_path / "disguised" / f"{SYN[2]}_x.JPEG"  # PostScript under an image name
    disguised.parent.mkdir()
    disguised.write_bytes(EPS)
    with pytest.raises(RuntimeError, match="cannot decode image .*_x.JPEG: cannot identify image file"):
        ImageFiles(scan(disguised.parent), lambda im: im)[0]
    assert rendered == []  # PIL's EPS plugin (Ghostscript) never ran


def _synsets(path, synsets):
    path.write_text("".join(f"{s} a class name\n" for s in synsets))  # LOC_synset_mapping.txt style
    return path


def test_synsets_file_must_be_the_1000_imagenet_synsets(tmp_path):
    for i in range(1, 4):
        _jpeg(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", i)
    (tmp_path / "gt.txt").write_text("1\n2\n1000\n")
    devkit = SYN[500:] + SYN[:500]
    ok = scan(tmp_path / "val", tmp_path / "gt.txt", _synsets(tmp_path / "ok.txt", devkit))
    assert [label for _, label in ok] == [500, 501, 499]
    for name, synsets, count in [("short.txt", devkit[:999], r"999 synsets \(999 distinct\)"),
                                 ("long.txt", devkit + [devkit[0]], r"1001 synsets \(1000 distinct\); repeated: n"),
                                 ("dup.txt", devkit[:999] + [devkit[5]], r"1000 synsets \(999 distinct\); repeated"),
                                 ("other.txt", devkit[:999] + ["n00000001"], r"1000 synsets .*not ImageNet-1k: n00000001")]:
        with pytest.raises(ValueError, match=rf"synsets file .*{name} must list the 1000 distinct ImageNet-1k synsets "
                                             rf"in ILSVRC2012 ID order, but has {count}"):
            scan(tmp_path / "val", tmp_path / "gt.txt", _synsets(tmp_path / name, synsets))
    (tmp_path / "bad.txt").write_text("n01440764\ntench\n")
    with pytest.raises(ValueError, match=r"synsets file .*bad.txt, line 2: 'tench' is not a synset"):
        scan(tmp_path / "val", tmp_path / "gt.txt", tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match=r"synsets file .*missing.txt not found"):
        scan(tmp_path / "val", tmp_path / "gt.txt", tmp_path / "missing.txt")


def test_labels_and_synsets_files_the_layout_does_not_use_are_errors(tmp_path):
    files = [_jpeg(tmp_path / "flat" / f"ILSVRC2012_val_{i:08d}.JPEG", i) for i in range(1, 3)]
    (tmp_path / "labels.txt").write_text("".join(f"{f.name} {SYN[i]}\n" for i, f in enumerate(files)))
    synsets = _synsets(tmp_path / "synsets.txt", SYN)
    with pytest.raises(ValueError, match=r"synsets_file .*synsets.txt applies only to the official ground truth"):
        scan(tmp_path / "flat", tmp_path / "labels.txt", synsets)
    with pytest.raises(ValueError, match=r"synsets_file .*synsets.txt is given without labels_file"):
        scan(tmp_path / "flat", None, synsets)
    _jpeg(tmp_path / "folders" / SYN[0] / "a.JPEG")
    with pytest.raises(ValueError, match=r"labels_file .*labels.txt is given but .*folders holds <synset>/ class folders"):
        scan(tmp_path / "folders", tmp_path / "labels.txt")


def test_bundled_photographs_name_their_extra(monkeypatch):
    import sys

    from vquant_pl.datamodules.imagenet import embedded_samples

    monkeypatch.setitem(sys.modules, "skimage", None)  # scikit-image not installed
    with pytest.raises(ImportError, match=r'scikit-image, which is not installed: pip install "vquant-pl\[quickstart\]"'):
        embedded_samples()


def test_labels_file_errors_name_file_and_line(tmp_path):
    files = [_jpeg(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", i) for i in range(1, 4)]
    one_column = tmp_path / "labels.txt"
    one_column.write_text(f"{files[0].name} {SYN[0]}\n{files[1].name}\n{files[2].name} {SYN[2]}\n")
    with pytest.raises(ValueError, match=r"labels file .*labels.txt, line 2: expected 'filename label', got one "
                                         r"column 'ILSVRC2012_val_00000002.JPEG'"):
        scan(tmp_path / "val", one_column)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(f"{files[0].name} {SYN[0]}\n{files[1].name} {SYN[1]}\n".encode() + b"caf\xe9.JPEG 3\n")
    with pytest.raises(ValueError, match=r"labels file .*latin1.txt, line 3: not UTF-8 text \(byte 0xe9\)"):
        scan(tmp_path / "val", latin1)
    short_csv = tmp_path / "labels.csv"
    short_csv.write_text(f"{files[0].stem},{SYN[0]}\n{files[1].stem}\n")
    with pytest.raises(ValueError, match=r"labels file .*labels.csv, line 2: expected 'filename,label'"):
        scan(tmp_path / "val", short_csv)


def test_preprocessing_from_the_model_config(tmp_path):
    timm = pytest.importorskip("timm")
    pl = pytest.importorskip("pytorch_lightning")
    import vquant_pl as vq

    _jpeg(tmp_path / "val" / SYN[0] / "a.JPEG")
    net = timm.create_model("convnext_atto.d2_in1k", pretrained=False, num_classes=1000)
    cfg = net.pretrained_cfg
    dm = ImageNetDataModule(tmp_path, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm.trainer = trainer
    trainer.strategy._lightning_module = vq.ImageClassifier(net)
    prep = dm.preprocessing  # timm's resolve_data_config at the test size
    assert prep.input_size == tuple(cfg["test_input_size"][1:]) == (288, 288)
    assert (prep.crop_pct, prep.interpolation, prep.crop_mode) == (cfg["test_crop_pct"], "bicubic", "center")
    assert ImageNetDataModule(tmp_path, image_size=96, preprocessing=prep).preprocessing.input_size == (96, 96)
    squash = Preprocessing(input_size=(64, 64), crop_pct=1.0, interpolation="bicubic", crop_mode="squash")
    out = squash.transform()(Image.new("RGB", (200, 50)))  # no crop of the long side: the whole image, squashed
    assert out.shape == (3, 64, 64)
    resize = [t for t in squash.transform().transforms if type(t).__name__ == "Resize"][0]
    assert resize.size == (64, 64)
    from vquant_pl.models import preprocessing_for
    from pytorchcv.model_provider import get_model

    assert preprocessing_for(get_model("inceptionv3", pretrained=False)).input_size == (299, 299)


def _attached(dm, module):
    """`dm` as the Trainer's data module with `module` as its LightningModule."""
    pl = pytest.importorskip("pytorch_lightning")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm.trainer = trainer
    trainer.strategy._lightning_module = module
    return dm


def test_the_model_preprocessing_reaches_the_data_module(tmp_path):
    import vquant_pl as vq

    _jpeg(tmp_path / "val" / SYN[0] / "a.JPEG")
    model, prep = vq.create_model("efficientnet_lite:lite2", pretrained=False)
    dm = _attached(ImageNetDataModule(tmp_path, num_workers=0), vq.ImageClassifier(model))
    assert dm.preprocessing == prep and prep.input_size == (260, 260) and prep.mean == (0.498,) * 3
    images, _ = next(iter(dm.test_dataloader()))
    assert images.shape == (1, 3, 260, 260)


def test_unknown_preprocessing_warns_once_naming_the_model(tmp_path):
    import warnings

    import vquant_pl as vq

    _jpeg(tmp_path / "val" / SYN[0] / "a.JPEG")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3))
    dm = _attached(ImageNetDataModule(tmp_path, image_size=32, num_workers=0), vq.ImageClassifier(net))
    with pytest.warns(UserWarning, match=r"the preprocessing of Sequential is unknown .* defaults are used for "
                                         r"interpolation, mean, std, crop_pct: 32x32 px"):
        assert dm.preprocessing == Preprocessing(input_size=(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(dm.test_dataloader())  # once per model
        full = _attached(ImageNetDataModule(tmp_path, image_size=32, crop_pct=1.0, interpolation="bicubic",
                                            mean=(0.5,) * 3, std=(0.5,) * 3, num_workers=0), vq.ImageClassifier(net))
        assert full.preprocessing.mean == (0.5,) * 3  # every decisive setting given: nothing defaulted
        given = _attached(ImageNetDataModule(tmp_path, preprocessing=Preprocessing(), num_workers=0),
                          vq.ImageClassifier(net))
        assert given.preprocessing == Preprocessing()


def test_left_out_entries_are_counted_by_kind(tmp_path):
    import os

    val = tmp_path / "val"
    _jpeg(val / SYN[0] / "a.JPEG")
    _jpeg(val / SYN[0] / "more" / "b.JPEG")  # a subfolder of a class folder: not read, counted
    _jpeg(val / SYN[0] / "more" / "deeper" / "c.JPEG")
    _jpeg(val / SYN[0] / "more" / ".hidden.JPEG")
    (val / SYN[0] / "empty").mkdir()
    _jpeg(val / SYN[1] / "d.JPEG")
    os.symlink(tmp_path / "nowhere.JPEG", val / SYN[1] / "e.JPEG")  # a broken link
    (val / SYN[1] / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning) as record:
        samples = scan(val)
    assert [(p.name, label) for p, label in samples] == [("a.JPEG", 0), ("d.JPEG", 1)]
    assert [str(w.message).split("; images are")[0] for w in record] == [(
        f"{val}: left out 1 file(s) that are not raster images ({SYN[1]}/notes.txt; suffixes .txt); "
        f"2 subfolder(s) of class folders holding 2 image(s), not read ({SYN[0]}/empty/ holds 0, {SYN[0]}/more/ "
        f"holds 2; images must sit directly in <synset>/); 1 broken link(s) or special file(s) "
        f"({SYN[1]}/e.JPEG -> {tmp_path / 'nowhere.JPEG'})")]


def test_official_ground_truth_matches_images_by_their_number(tmp_path):
    synsets = _synsets(tmp_path / "synsets.txt", SYN)
    unofficial = tmp_path / "unofficial"
    for k in range(1, 13):  # 1.png .. 12.png: their name order is not their number order
        _jpeg(unofficial / f"{k}.png", k)
    (tmp_path / "gt12.txt").write_text("".join(f"{k}\n" for k in range(1, 13)))
    with pytest.raises(ValueError, match=r"gt12.txt is the official ground truth \(line N: the ID of image "
                                         r"ILSVRC2012_val_N\), but 1.png is not named ILSVRC2012_val_<8 digits>"):
        scan(unofficial, tmp_path / "gt12.txt", synsets)
    gap = tmp_path / "gap"
    for k in (1, 2, 4):  # image 3 missing, image 4 present
        _jpeg(gap / f"ILSVRC2012_val_{k:08d}.JPEG", k)
    (tmp_path / "gt3.txt").write_text("7\n8\n9\n")
    with pytest.raises(ValueError, match=r"gt3.txt has no ID on line 4, the line of ILSVRC2012_val_00000004.JPEG"):
        scan(gap, tmp_path / "gt3.txt", synsets)
    twice = tmp_path / "twice"
    for name in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000001.png", "ILSVRC2012_val_00000002.JPEG"):
        _jpeg(twice / name)
    with pytest.raises(ValueError, match=r"ILSVRC2012_val_00000001.JPEG and ILSVRC2012_val_00000001.png are both "
                                         r"image 1 of labels file .*gt3.txt"):
        scan(twice, tmp_path / "gt3.txt", synsets)
    ok = tmp_path / "ok"
    for k in range(1, 4):
        _jpeg(ok / f"ILSVRC2012_val_{k:08d}.JPEG", k)
    assert [label for _, label in scan(ok, tmp_path / "gt3.txt", synsets)] == [6, 7, 8]
    blank = tmp_path / "blank.txt"
    blank.write_text("7\n\n8\n9\n")  # an empty line would shift every later label
    with pytest.raises(ValueError, match=r"blank.txt has no ID on line 2, the line of ILSVRC2012_val_00000002.JPEG"):
        scan(ok, blank, synsets)


def test_wide_integer_images_are_scaled_to_8_bits(tmp_path):
    import numpy as np

    levels = np.arange(0, 256, 17)  # 16 grey levels, 0 .. 255
    Image.fromarray((levels * 257).astype(np.uint16).reshape(4, 4)).save(tmp_path / f"{SYN[0]}_a.png")  # I;16
    Image.fromarray((levels * 257).astype(np.uint16).reshape(4, 4)).save(tmp_path / f"{SYN[1]}_b.pgm")  # I (PPM)
    wide = (levels.astype(np.int64) << 23).astype(np.int32).reshape(4, 4)
    wide[0, 0] = -5  # negative: black
    Image.fromarray(wide, "I").save(tmp_path / f"{SYN[2]}_c.tif")  # 32-bit signed
    Image.fromarray(levels.astype(np.int32).reshape(4, 4), "I").save(tmp_path / f"{SYN[3]}_d.tif")  # 8-bit values
    Image.fromarray((levels * 257).astype(np.int32).reshape(4, 4), "I").save(tmp_path / f"{SYN[4]}_e.tif")  # 16-bit
    files = ImageFiles(scan(tmp_path), lambda im: (im.mode, np.asarray(im)))
    for i in range(5):
        (mode, pixels), label = files[i]
        assert mode == "RGB" and label == i
        assert (pixels == levels.reshape(4, 4, 1)).all(), pixels[..., 0]


def test_fewer_images_than_processes_is_named_before_the_sampler(tmp_path):
    from types import SimpleNamespace

    for i in range(3):
        _jpeg(tmp_path / "val" / SYN[i] / "a.JPEG", i)
    for rank in (0, 1):
        dm = ImageNetDataModule(tmp_path, image_size=16, num_workers=0, limit=1)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        with pytest.raises(ValueError, match=r"^1 image\(s\) \(limit=1\) for world size 2: each image is evaluated "
                                             r"by exactly one process.* use at most 1 device\(s\)"):
            dm.test_dataloader()
    dm = ImageNetDataModule(tmp_path, image_size=16, num_workers=0)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    assert [labels.tolist() for _, labels in dm.test_dataloader()] == [[1]]  # 3 images, 2 processes: rank 1 gets one
