"""BN calibration data: a seeded random sample of the whole training file (never "the first N",
which is one class of an ImageFolder file), in random order, under either protocol."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from st_scale.config import DataSection
from st_scale.data.commands import convert
from st_scale.data.digits import load_digits_splits
from st_scale.data.loaders import BatchPreparer, calibration_batches, calibration_indices, eval_loader, materialise
from st_scale.evaluate.subnets import evaluate_main
from st_scale.models import create_model


@pytest.fixture(scope="module")
def class_sorted_digits(tmp_path_factory):
    """The digits set as an ImageFolder tree, converted by `st-scale convert imagefolder`: the
    .beton files are in class order, as ImageNet's would be."""
    from PIL import Image

    root = tmp_path_factory.mktemp("digits_folder")
    train, val = load_digits_splits(32)
    for split, data in (("train", train), ("val", val)):
        for i, (image, label) in enumerate(zip(data.images, data.labels)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path_factory.mktemp("digits_sorted")
    convert("imagefolder", str(root), out, write_mode="raw", quiet=True)
    return out


def _data(directory, **overrides) -> DataSection:
    fields = dict(
        train=str(directory / "train.beton"),
        val=str(directory / "val.beton"),
        pipeline="cifar",
        image_size=32,
        pad_crop=2,
        flip=False,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        val_batch_size=128,
        calibration_images=256,
    )
    return DataSection(**(fields | overrides))


def _labels_in_file_order(data: DataSection) -> np.ndarray:
    loader = eval_loader(data, data.train, indices=None, num_workers=1, device=torch.device("cpu"))
    return np.concatenate([y.numpy() for _, y in materialise(loader)])


def test_the_converted_imagefolder_is_class_sorted(class_sorted_digits):
    labels = _labels_in_file_order(_data(class_sorted_digits))
    assert (np.diff(labels) >= 0).all()  # the premise of the tests below


def test_calibration_indices_are_a_seeded_sample_of_the_whole_file():
    a, b, c = (
        calibration_indices(1000, 100, seed=3),
        calibration_indices(1000, 100, seed=3),
        calibration_indices(1000, 100, seed=4),
    )
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(a.tolist())) == 100 and a.min() >= 0 and a.max() < 1000
    assert a.max() > 500 and not np.array_equal(np.sort(a), np.arange(100))  # not the first 100
    assert len(calibration_indices(50, 100, seed=0)) == 50  # capped at the file's size


def test_calibration_batches_span_the_classes_in_random_order(class_sorted_digits):
    data = _data(class_sorted_digits)
    n_train = len(_labels_in_file_order(data))
    preparer = BatchPreparer(data, torch.device("cpu"), torch.float32, seed=0, rank=0)
    batches = calibration_batches(
        data, preparer, num_samples=n_train, seed=0, num_workers=1, device=torch.device("cpu")
    )
    labels = torch.cat([y for _, y in batches]).numpy()
    assert len(labels) == 256 and set(labels.tolist()) == set(range(10))
    # labels follow the sample's order: the file's label at each drawn index
    file_labels = _labels_in_file_order(data)
    assert np.array_equal(labels, file_labels[calibration_indices(n_train, 256, seed=0)])
    assert all(len(set(y.tolist())) >= 5 for _, y in batches)  # every batch mixes classes


def test_the_train_protocol_augments_reproducibly(class_sorted_digits):
    eval_data, train_data = _data(class_sorted_digits), _data(class_sorted_digits, calibration_protocol="train")
    cpu = torch.device("cpu")

    def batches(data, seed=0):
        preparer = BatchPreparer(data, cpu, torch.float32, seed=seed, rank=0)
        return calibration_batches(data, preparer, num_samples=1438, seed=0, num_workers=1, device=cpu)

    plain, augmented, again = batches(eval_data), batches(train_data), batches(train_data)
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(plain, augmented))  # the same images ...
    assert not torch.equal(plain[0][0], augmented[0][0])  # ... padded-and-cropped
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(augmented, again))  # the same on every rank and epoch


@pytest.mark.slow
def test_on_a_class_sorted_file_reestimated_accuracy_matches_the_running_statistics(class_sorted_digits):
    """A trained net's main-net accuracy on re-estimated BN statistics is within a point of its
    accuracy on its running statistics, or above it: re-estimating on one class's images ruins it."""
    torch.manual_seed(0)
    train, val = load_digits_splits(32)

    def tensors(split):
        x = (torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        return x, torch.from_numpy(split.labels)

    (x, y), (vx, vy) = tensors(train), tensors(val)
    model = create_model("cifar_resnet20", 10, stage_depths=(1, 1, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for epoch in range(4):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(y), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    data = _data(class_sorted_digits, calibration_images=128, val_batch_size=32)  # the first 128 are one class
    preparer = BatchPreparer(data, torch.device("cpu"), torch.float32, seed=0, rank=0)
    calibration = calibration_batches(
        data, preparer, num_samples=1438, seed=0, num_workers=1, device=torch.device("cpu")
    )
    val_batches = [(vx[i : i + 128], vy[i : i + 128]) for i in range(0, len(vy), 128)]
    running = evaluate_main(model, val_batches).top1
    reestimated = evaluate_main(model, val_batches, calibration).top1
    assert running > 60, running  # the net has learned: the premise of the comparison
    assert reestimated >= running - 1.0, (running, reestimated)
