"""FFCV loaders for training, validation and BN calibration, and the on-device batch preparation.

Loaders return uint8 NCHW tensors; `BatchPreparer` turns them into normalised float batches on the
worker's device. CIFAR-size augmentation (pad-crop, flip) runs there too, in torch, from a
generator seeded by (seed, global step, rank): a resumed run sees exactly the batches the
uninterrupted one would have. ImageNet-size training crops inside FFCV's decoder
(RandomResizedCrop), whose randomness FFCV does not seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataSection, ModelSection
from ..sampling import STREAM_AUGMENT, STREAM_CALIBRATION, step_rng
from .ffcv_import import import_ffcv

Batch = tuple[torch.Tensor, torch.Tensor]


# The pipelines are built by train_loader and eval_loader, which import FFCV first (import_ffcv).
def _image_pipeline(data: DataSection, train: bool, device: torch.device):
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    if data.pipeline == "cifar":
        ops = [SimpleRGBImageDecoder()]
    elif train:
        ops = [RandomResizedCropRGBImageDecoder((data.image_size, data.image_size))]
        if data.flip:
            ops.append(RandomHorizontalFlip())
    else:
        size = data.val_image_size or data.image_size
        ops = [CenterCropRGBImageDecoder((size, size), ratio=data.val_crop_ratio)]
    ops.append(ToTensor())
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    ops.append(ToTorchImage())
    return ops


def _label_pipeline(device: torch.device):
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    ops = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


class TrainLoader:
    """The training loader, whose random-resized crops take the epoch's resolution
    (`data.progressive_resizing`): FFCV sizes its buffers when an epoch's iteration starts."""

    def __init__(self, loader, data: DataSection, decoder):
        self.loader, self.data, self._decoder = loader, data, decoder

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)

    def set_epoch(self, epoch: int) -> int:
        """The coming epoch: its shuffle order (FFCV's is a function of the seed and the epoch, so a
        resumed run continues it) and its crops' resolution, which this returns."""
        self.loader.next_epoch = epoch
        size = self.data.train_image_size(epoch)
        if self.data.pipeline != "cifar":  # CIFAR-size images are decoded at their stored size
            self._decoder.output_size = (size, size)
        return size


def train_loader(
    data: DataSection, *, batch_size: int, seed: int, num_workers: int, device: torch.device, distributed: bool
) -> TrainLoader:
    """Shuffled; with `distributed`, sharded across ranks by DistributedSampler (the process group must exist)."""
    import_ffcv()
    from ffcv.loader import Loader, OrderOption

    image_ops = _image_pipeline(data, True, device)
    decoder = image_ops[0]  # FFCV takes it out of the list
    loader = Loader(
        data.train,
        batch_size=batch_size,
        num_workers=num_workers,
        order=OrderOption.RANDOM,
        distributed=distributed,
        seed=seed,
        drop_last=True,
        pipelines={"image": image_ops, "label": _label_pipeline(device)},
    )
    return TrainLoader(loader, data, decoder)


def eval_loader(
    data: DataSection,
    path: str,
    *,
    indices: Iterable[int] | None,
    num_workers: int,
    device: torch.device,
    augment: bool = False,
):
    """Sequential, nothing dropped; `indices` selects this rank's share. No augmentation, unless
    `augment` asks for the training pipeline's decoder (ImageNet-size random-resized crops)."""
    import_ffcv()
    from ffcv.loader import Loader, OrderOption

    return Loader(
        path,
        batch_size=data.val_batch_size,
        num_workers=num_workers,
        order=OrderOption.SEQUENTIAL,
        indices=None if indices is None else np.asarray(list(indices)),
        drop_last=False,
        pipelines={"image": _image_pipeline(data, augment, device), "label": _label_pipeline(device)},
    )


def calibration_indices(num_samples: int, count: int, seed: int) -> np.ndarray:
    """Which training images re-estimate BatchNorm statistics: a seeded random sample of the whole
    file, the same on every rank and at every epoch (so evaluations stay comparable). Never "the
    first N": a file written from an ImageFolder is in class order, and its first N are one class."""
    rng = np.random.default_rng([seed, STREAM_CALIBRATION])
    return rng.choice(num_samples, size=min(count, num_samples), replace=False)


def other_protocol(protocol: str) -> str:
    """The calibration protocol a run compares its own with (`eval.compare_calibration`)."""
    return "train" if protocol == "eval" else "eval"


def calibration_sets(
    data: DataSection, preparer: BatchPreparer, *, compare: bool, **read
) -> tuple[list[Batch], list[Batch] | None]:
    """The calibration batches of the run's protocol and, with `compare`, those of the other protocol
    (`read`: what `calibration_batches` takes besides the data and the preparer)."""
    own = calibration_batches(data, preparer, **read)
    if not compare:
        return own, None
    other = data.model_copy(update={"calibration_protocol": other_protocol(data.calibration_protocol)})
    return own, calibration_batches(other, preparer, **read)


def calibration_batches(
    data: DataSection, preparer: BatchPreparer, *, num_samples: int, seed: int, num_workers: int, device: torch.device
) -> list[Batch]:
    """The prepared calibration batches of `data.calibration_protocol`, in the sample's random
    order (batches of a class-sorted file read in file order would each hold one class, and a
    cumulative average of per-batch variances would miss the variance between classes).

    - eval: un-augmented, the evaluation transform (centre crop at evaluation size on ImageNet);
    - train: the training augmentation at training resolution (the authors' protocol), seeded
      for CIFAR-size data; ImageNet-size random-resized crops come from FFCV's decoder, unseeded.
    """
    indices = calibration_indices(num_samples, data.calibration_images, seed)
    augment = data.calibration_protocol == "train"
    loader = eval_loader(
        data,
        data.train,
        indices=np.sort(indices),
        num_workers=num_workers,
        device=device,
        augment=augment and data.pipeline != "cifar",
    )
    images, labels = zip(*materialise(loader))
    images, labels = torch.cat(images), torch.cat(labels)
    order = torch.from_numpy(np.argsort(np.argsort(indices)))  # file order -> the sample's random order
    images, labels = images[order], labels[order]
    size = data.val_batch_size
    batches = []
    for i, start in enumerate(range(0, len(labels), size)):
        x = images[start : start + size]
        x = preparer.calibration(x, i) if augment else preparer.eval(x)
        batches.append((x, labels[start : start + size].to(device).long()))
    return batches


# AlexNet's PCA of ImageNet's RGB pixels (as the reference code's Lighting transform uses it)
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of [0, 1] RGB images, N x 1 x H x W (torchvision's rgb_to_grayscale)."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def memory_format(model: ModelSection) -> torch.memory_format:
    """The batches' layout a recipe asks for (`model.channels_last`)."""
    return torch.channels_last if model.channels_last else torch.contiguous_format


class BatchPreparer:
    """uint8 NCHW -> normalised float (or bf16) on the device, with seeded CIFAR-size augmentation;
    batches come out in `memory_format` (FFCV decodes channels_last: keeping it costs no copy)."""

    def __init__(
        self,
        data: DataSection,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        rank: int,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        self.data, self.device, self.dtype, self.seed, self.rank = data, device, dtype, seed, rank
        self.memory_format = memory_format
        self.mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(data.std, device=device).view(1, 3, 1, 1) * 255

    def _finish(self, normalised: torch.Tensor) -> torch.Tensor:
        """The training dtype and the recipe's layout: what every batch leaves the preparer as."""
        return normalised.to(self.dtype).contiguous(memory_format=self.memory_format)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        return self._finish((images - self.mean) / self.std)

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        return self._normalise(images)

    def train(self, images: torch.Tensor, step: int) -> torch.Tensor:
        rng = step_rng(self.seed, step, rank=self.rank, stream=STREAM_AUGMENT)
        return self._augment(images, rng) if self.data.pipeline == "cifar" else self._photometric(images, rng)

    def calibration(self, images: torch.Tensor, batch_index: int) -> torch.Tensor:
        """The training augmentation for calibration batch `batch_index`: the same on every rank."""
        rng = step_rng(self.seed, batch_index, stream=STREAM_CALIBRATION)
        # ImageNet-size batches are cropped and flipped by the decoder already
        return self._augment(images, rng) if self.data.pipeline == "cifar" else self._photometric(images, rng)

    def _photometric(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """ImageNet-size colour augmentation, seeded: ColorJitter (brightness, contrast, saturation in
        this order) then AlexNet PCA lighting, on [0, 1] images as the reference applies them."""
        jitter, lighting = self.data.color_jitter, self.data.pca_lighting
        if not jitter and not lighting:
            return self._normalise(images)
        x = images.to(self.device, non_blocking=True).float() / 255
        n = x.shape[0]

        def per_image(values) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.float32, device=self.device).view(n, 1, 1, 1)

        if jitter:
            low, high = 1 - jitter, 1 + jitter
            x = (x * per_image(rng.uniform(low, high, n))).clamp(0, 1)
            grey_mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - grey_mean) * per_image(rng.uniform(low, high, n)) + grey_mean).clamp(0, 1)
            grey = _grey(x)
            x = ((x - grey) * per_image(rng.uniform(low, high, n)) + grey).clamp(0, 1)
        if lighting:
            alpha = torch.as_tensor(rng.normal(0, lighting, (n, 3)), dtype=torch.float32, device=self.device)
            shift = (alpha * PCA_EIGVAL.to(self.device)) @ PCA_EIGVEC.to(self.device).T  # n x 3
            x = x + shift[:, :, None, None]
        return self._finish((x * 255 - self.mean) / self.std)

    def _augment(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        n, _, h, w = images.shape
        pad = self.data.pad_crop
        if pad:
            padded = F.pad(images, (pad, pad, pad, pad))  # zero (black) padding before normalisation
            dy = torch.from_numpy(rng.integers(0, 2 * pad + 1, n)).to(self.device)
            dx = torch.from_numpy(rng.integers(0, 2 * pad + 1, n)).to(self.device)
            rows = (torch.arange(h, device=self.device)[None, :] + dy[:, None])[:, None, :, None]
            cols = (torch.arange(w, device=self.device)[None, :] + dx[:, None])[:, None, None, :]
            batch = torch.arange(n, device=self.device)[:, None, None, None]
            channel = torch.arange(3, device=self.device)[None, :, None, None]
            images = padded[batch, channel, rows, cols]
        if self.data.flip:
            flip = torch.from_numpy(rng.random(n) < 0.5).to(self.device)[:, None, None, None]
            images = torch.where(flip, images.flip(-1), images)
        return self._finish((images - self.mean) / self.std)

    def eval_batches(self, loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in loader:
            yield self.eval(images), labels.to(self.device).long()


def materialise(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keep batches in memory (FFCV's buffers rotate: clone what you keep)."""
    return [(x.clone(), y.clone()) for x, y in batches]
