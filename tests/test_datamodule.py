"""ImageNetDataModule: layouts, labels, and bad input named before any work."""
import pytest
import torch
from PIL import Image

from vquant_pl.datamodules import ImageNetDataModule, imagenet_synsets
from vquant_pl.datamodules.imagenet import ImageFiles, collate_skipping, scan

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
    images, labels, skipped = next(iter(dm.test_dataloader()))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1] and skipped == 0


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
