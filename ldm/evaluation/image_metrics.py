"""FID, KID, Inception Score and precision/recall/density/coverage of generated images, from a local file of
Inception-v3 weights: nothing here downloads.

The recipe: `InceptionFeatures(weights_path)` turns each image set into `ImageFeatures` once (the network is the
whole cost), then `fid`, `kid`, `inception_score` and `precision_recall` compare two such sets through
torchmetrics' metric classes and prdc. `reference_features` keeps a reference set's features in a cache folder.

The settings are the standard ones (torch-fidelity's and the TF original's), so numbers compare with papers'
when the weights are the standard file: images quantised to uint8 with rounding, as PNGs of them would be;
torch-fidelity's TF1-compatible bilinear resize to 299 (torchmetrics >= 1.8 antialiases by default, which moves
FID); float64 statistics. Any set of settings that changes the numbers is recorded with the features, and two
sets made differently, or of different sizes (FID falls as N grows), are refused rather than compared.
"""

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import prdc
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ldm.evaluation.torchmetrics_import import (
    FeatureExtractorInceptionV3,
    FrechetInceptionDistance,
    InceptionScore,
    KernelInceptionDistance,
)

# The FID network converted from TF's inception-2015-12-05 by torch-fidelity, released as
# weights-inception-2015-12-05-6726825d.pth (pytorch-fid's pt_inception-2015-12-05-6726825d.pth carries the same
# suffix). Torch hub names such files by the first 8 hex digits of their sha256, so the prefix is what we can
# check: the full hash is published nowhere we could verify offline (one public project's notes give
# 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2; unconfirmed, so not relied on).
STANDARD_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
STANDARD_SHA256_PREFIX = "6726825d"
FEATURE_SIZES = (64, 192, 768, 2048)
STANDARD_FEATURE_SIZE = 2048
# torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x to 299x299, the only resize offered here.
RESIZE = "tf1-bilinear-299"
CACHE_FORMAT = "1"
# KID and IS warn at construction that they keep every feature in memory: here they are handed features already
# held, so the warning tells nothing.
KEEPS_FEATURES_WARNING = "Metric `.*` will save all extracted features in buffer"


def check_weights_file(path: str) -> str:
    """The sha256 of an Inception weights file, after checking it exists and is a plain tensor file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights file {path} does not exist. Give the path of torch-fidelity's {STANDARD_WEIGHTS_FILE} "
            "(or pytorch-fid's pt_inception-2015-12-05-6726825d.pth); nothing is downloaded.")
    try:
        # torch-fidelity loads the file with weights_only=False, which runs any pickle: refuse anything but
        # tensors before it does.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"Inception weights file {path} is not a torch state-dict file: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"Inception weights file {path} holds a {type(state).__name__}, not a state dict of tensors")
    digest = hashlib.sha256()  # hashlib.file_digest would need Python 3.11
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images as uint8: floats in [0, 1] are rounded, `(x * 255).round()`, as diffusers does before it
    writes PNGs. torchmetrics' own `normalize=True` truncates instead, biasing every pixel by half a grey level."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be an (N, 3, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 in [0, 255] or floats in [0, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"images {bad[:10]} of the batch hold NaN or infinite values")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"float images must lie in [0, 1], these span [{low:.4g}, {high:.4g}]")
    return (images * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class ImageFeatures:
    """One image set's Inception features, with every setting that made them."""

    features: torch.Tensor  # (N, feature_size) float32, as the network returned them
    weights_sha256: str
    resolution: tuple[int, int]  # (H, W) of the images fed in, before the resize to 299
    logits: torch.Tensor | None = None  # (N, 1008) 'logits_unbiased', what the Inception Score needs
    resize: str = RESIZE
    name: str = "generated"
    fingerprint: str = ""  # for a reference set, the caller's identity of its images

    @property
    def count(self) -> int:
        return self.features.shape[0]

    @property
    def feature_size(self) -> int:
        return self.features.shape[1]

    def settings(self) -> dict[str, object]:
        """What must be equal for two sets to be compared."""
        return dict(weights_sha256=self.weights_sha256, resize=self.resize, feature_size=self.feature_size,
                    resolution=self.resolution, count=self.count)


class InceptionFeatures:
    """torch-fidelity's FID Inception-v3, loaded from `weights_path` by its own loading code, as a callable from
    images to `ImageFeatures`. `with_logits` also keeps the class logits for the Inception Score: nearly free at
    2048-d features, the whole network's cost at smaller ones (which stop after an early block)."""

    def __init__(self, weights_path: str, feature_size: int = STANDARD_FEATURE_SIZE, with_logits: bool = True,
                 batch_size: int = 32, device: str | torch.device = "cpu"):
        if feature_size not in FEATURE_SIZES:
            raise ValueError(f"feature_size {feature_size} is not one of Inception's pooled layers {FEATURE_SIZES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.weights_sha256 = check_weights_file(weights_path)
        self.feature_size, self.with_logits, self.batch_size = feature_size, with_logits, batch_size
        layers = [str(feature_size)] + (["logits_unbiased"] if with_logits else [])
        try:
            self.network = FeatureExtractorInceptionV3("inception-v3-compat", layers,
                                                       feature_extractor_weights_path=weights_path)
        except RuntimeError as error:  # strict load_state_dict: missing or unexpected keys, wrong shapes
            summary = str(error) if len(str(error)) < 600 else str(error)[:600] + " ..."
            raise ValueError(f"Inception weights file {weights_path} does not fit torch-fidelity's "
                             f"Inception-v3 (566 tensors, 23.9M parameters): {summary}") from error
        self.device = torch.device(device)
        self.network.to(self.device)

    def __call__(self, images: torch.Tensor | Iterable[torch.Tensor], name: str = "generated",
                 fingerprint: str = "", progress: bool = True) -> ImageFeatures:
        """Features of `images`: one (N, 3, H, W) tensor, uint8 or floats in [0, 1], or an iterable of such
        batches (a generator is read one batch at a time). All must share one resolution."""
        total = None
        if isinstance(images, torch.Tensor):
            images, total = [to_uint8(images)], len(images)  # checked whole, so a bad image fails before any work
        features, logits, resolution = [], [], None
        with tqdm(total=total, desc=f"Inception features ({name})", unit="img", disable=not progress,
                  leave=False) as bar:
            for batch in images:
                batch = to_uint8(batch)
                if resolution is None:
                    resolution = tuple(batch.shape[2:])
                elif tuple(batch.shape[2:]) != resolution:
                    raise ValueError(f"images of {name} change resolution from {resolution} to "
                                     f"{tuple(batch.shape[2:])}; one set must have one resolution")
                for chunk in batch.split(self.batch_size):
                    with torch.no_grad():
                        outputs = [output.cpu() for output in self.network(chunk.to(self.device))]
                    features.append(outputs[0])
                    if self.with_logits:
                        logits.append(outputs[1])
                    bar.update(len(chunk))
        if resolution is None:
            raise ValueError(f"no images were given for {name}")
        return ImageFeatures(torch.cat(features), self.weights_sha256, resolution,
                             torch.cat(logits) if self.with_logits else None, name=name, fingerprint=fingerprint)


@dataclass(frozen=True)
class MetricResult:
    metric: str  # "fid", "kid", "inception_score", "precision", "recall", "density", "coverage"
    name: str  # for reports: "FID", or "FID (non-standard Inception weights)" and the like
    value: float
    std: float | None
    standard: bool  # the standard weights and settings, so comparable with other papers' numbers
    count: int  # images per set


def result(metric: str, title: str, value: float, std: float | None, features: ImageFeatures,
           uses_pool_features: bool = True) -> MetricResult:
    """The metric's result, named for what keeps it from comparing with published numbers, if anything does."""
    reasons = [] if features.weights_sha256.startswith(STANDARD_SHA256_PREFIX) else ["non-standard Inception weights"]
    if uses_pool_features and features.feature_size != STANDARD_FEATURE_SIZE:
        reasons.append(f"{features.feature_size}-d features")
    name = f"{title} ({', '.join(reasons)})" if reasons else title
    return MetricResult(metric, name, float(value), None if std is None else float(std), not reasons, features.count)


def check_comparable(reference: ImageFeatures, generated: ImageFeatures) -> None:
    """Refuse two sets made with different settings or of different sizes: their distances measure that
    difference too. Sample counts must match because FID (and PR's neighbourhoods) shift with N."""
    made = reference.settings()
    mismatches = [f"{key} {made[key]} vs {value}" for key, value in generated.settings().items() if made[key] != value]
    if mismatches:
        raise ValueError(f"reference {reference.name!r} and {generated.name!r} cannot be compared, they differ in "
                         f"{'; '.join(mismatches)} (reference first). Make both with the same weights, feature size "
                         "and resolution, and the same number of images.")


def check_enough_images(count: int, kid_subset_size: int | None = None, nearest_k: int = 5,
                        splits: int = 10) -> None:
    """Fail before any image is generated when `count` images per set cannot give every metric."""
    needs = {"FID": 2, "KID (subset size)": max(2, kid_subset_size or 2), "precision/recall (nearest_k + 2)":
             nearest_k + 2, "the Inception Score (splits)": splits}
    short = [f"{metric} needs {need}" for metric, need in needs.items() if count < need]
    if short:
        raise ValueError(f"{count} images per set are too few: {', '.join(short)}")


class GivenFeatures(torch.nn.Module):
    """The 'feature extractor' handed to torchmetrics' metrics: the features were computed once for all of them,
    so the metric's network is the identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(reference: ImageFeatures, generated: ImageFeatures) -> MetricResult:
    """Fréchet Inception Distance (Heusel et al. 2017) through torchmetrics, on float64 statistics."""
    check_comparable(reference, generated)
    if generated.count < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {generated.count}")
    metric = FrechetInceptionDistance(feature=GivenFeatures(generated.feature_size))
    metric.update(reference.features.double(), real=True)
    metric.update(generated.features.double(), real=False)
    return result("fid", "FID", metric.compute().item(), None, generated)


def kid(reference: ImageFeatures, generated: ImageFeatures, subset_size: int | None = None, subsets: int = 100,
        seed: int = 0) -> MetricResult:
    """Kernel Inception Distance (Bińkowski et al. 2018), mean and std over `subsets` random subsets of
    `subset_size` (default: 1000, torch-fidelity's, or every image when there are fewer). Unbiased in N,
    so better than FID for small sets. The subsets are drawn from `seed`."""
    check_comparable(reference, generated)
    subset_size = min(1000, generated.count) if subset_size is None else subset_size
    if not 2 <= subset_size <= generated.count:
        raise ValueError(f"KID subset_size {subset_size} must lie between 2 and the {generated.count} images per set")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=KEEPS_FEATURES_WARNING)
        metric = KernelInceptionDistance(feature=GivenFeatures(generated.feature_size), subsets=subsets,
                                         subset_size=subset_size)
    metric.update(reference.features.double(), real=True)
    metric.update(generated.features.double(), real=False)
    # torchmetrics draws the subsets with an unseeded torch.randperm; fork_rng puts the caller's state back.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return result("kid", "KID", mean.item(), std.item(), generated)


def inception_score(generated: ImageFeatures, splits: int = 10, seed: int = 0) -> MetricResult:
    """Inception Score (Salimans et al. 2016): mean and std over `splits` splits of the images, shuffled with
    `seed`. ImageNet-class specific, so of little meaning for data far from ImageNet."""
    if generated.logits is None:
        raise ValueError(f"{generated.name!r} was made without logits: use InceptionFeatures(..., with_logits=True)")
    if not 1 <= splits <= generated.count:
        raise ValueError(f"Inception Score splits {splits} must lie between 1 and the {generated.count} images")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=KEEPS_FEATURES_WARNING)
        metric = InceptionScore(feature=GivenFeatures(generated.logits.shape[1]), splits=splits)
    metric.update(generated.logits.double())
    # torchmetrics shuffles with an unseeded torch.randperm before it splits; fork_rng restores the caller's state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return result("inception_score", "IS", mean.item(), std.item(), generated, uses_pool_features=False)


def precision_recall(reference: ImageFeatures, generated: ImageFeatures, nearest_k: int = 5) -> dict[str, MetricResult]:
    """Precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020) through prdc,
    on the same Inception features. Precision, recall and coverage lie in [0, 1]; density does not stop at 1
    (it counts how many real neighbourhoods hold each generated image, over k). The papers used VGG-16
    features, so these numbers are the project's own, not theirs."""
    check_comparable(reference, generated)
    if generated.count < nearest_k + 2:
        raise ValueError(f"precision/recall with nearest_k {nearest_k} need at least {nearest_k + 2} images per set, "
                         f"got {generated.count}")
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):  # prdc prints the set sizes on every call
        values = prdc.compute_prdc(reference.features.double().numpy(), generated.features.double().numpy(),
                                   nearest_k=nearest_k)
    titles = dict(precision="Precision", recall="Recall", density="Density", coverage="Coverage")
    return {metric: result(metric, title, values[metric], None, generated) for metric, title in titles.items()}


def image_metrics(reference: ImageFeatures, generated: ImageFeatures, kid_subset_size: int | None = None,
                  nearest_k: int = 5, splits: int = 10, seed: int = 0) -> dict[str, MetricResult]:
    """Every metric here for one generated set: FID, KID, precision/recall/density/coverage, and the Inception
    Score when the generated features have logits."""
    results = dict(fid=fid(reference, generated), kid=kid(reference, generated, kid_subset_size, seed=seed))
    results.update(precision_recall(reference, generated, nearest_k))
    if generated.logits is not None:
        results["inception_score"] = inception_score(generated, splits, seed)
    return results


# Reference features on disk ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReferenceSet:
    """A reference image set as the cache knows it: the caller's name and fingerprint of its images (a content
    hash, or a dataset id with its revision and split: what tells this set from another of the same name), and
    the number of images and the resolution it must give."""

    name: str
    fingerprint: str
    count: int
    resolution: int | tuple[int, int]  # (H, W), or one side of square images


def resolution_text(resolution: int | tuple[int, int]) -> str:
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    return f"{height}x{width}"


def features_metadata(features: ImageFeatures) -> dict[str, str]:
    """Every setting that changes the features, as the text safetensors keeps beside the tensors."""
    return dict(format=CACHE_FORMAT, name=features.name, fingerprint=features.fingerprint,
                count=str(features.count), resolution=resolution_text(features.resolution),
                weights_sha256=features.weights_sha256, resize=features.resize, feature_size=str(features.feature_size))


def save_features(features: ImageFeatures, path: str | Path) -> None:
    """Write `features` and their settings to a safetensors file, whole or not at all."""
    tensors = {"features": features.features.contiguous()}
    if features.logits is not None:
        tensors["logits"] = features.logits.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata=features_metadata(features))
    os.replace(partial, path)  # readers never see half a file, even with another process writing the same one


def load_features(path: str | Path) -> ImageFeatures:
    """Features saved by `save_features`, with the settings they were made with."""
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not an ldm features file of format {CACHE_FORMAT} (metadata {metadata})")
    tensors = load_file(str(path))
    height, width = (int(side) for side in metadata["resolution"].split("x"))
    features = ImageFeatures(tensors["features"], metadata["weights_sha256"], (height, width), tensors.get("logits"),
                             metadata["resize"], metadata["name"], metadata["fingerprint"])
    if str(features.count) != metadata["count"] or str(features.feature_size) != metadata["feature_size"]:
        raise ValueError(f"{path} holds {tuple(features.features.shape)} features, its metadata says "
                         f"{metadata['count']} x {metadata['feature_size']}: the file is damaged")
    return features


def reference_features(images: torch.Tensor | Iterable[torch.Tensor], reference: ReferenceSet,
                       extractor: InceptionFeatures, cache_dir: str | Path, progress: bool = True) -> ImageFeatures:
    """The features of a reference set, from `cache_dir` when a file made with the same settings is there, else
    computed from `images` (a generator of batches is then read, and otherwise never touched) and saved."""
    expected = dict(format=CACHE_FORMAT, name=reference.name, fingerprint=reference.fingerprint,
                    count=str(reference.count), resolution=resolution_text(reference.resolution),
                    weights_sha256=extractor.weights_sha256, resize=RESIZE, feature_size=str(extractor.feature_size))
    key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in reference.name)
    path = Path(cache_dir) / f"{slug}-{key}.safetensors"
    if path.exists():
        cached = load_features(path)
        found = features_metadata(cached)
        mismatches = [f"{name} {found[name]!r}, expected {value!r}" for name, value in expected.items()
                      if found[name] != value]
        if mismatches:
            raise ValueError(f"cached reference features {path} were made with other settings: "
                             f"{'; '.join(mismatches)}. Delete the file to rebuild it.")
        return cached
    features = extractor(images, name=reference.name, fingerprint=reference.fingerprint, progress=progress)
    made = dict(count=str(features.count), resolution=resolution_text(features.resolution))
    wrong = [f"{name} {expected[name]} but the images gave {value}" for name, value in made.items()
             if value != expected[name]]
    if wrong:
        raise ValueError(f"reference {reference.name!r} was declared with {'; '.join(wrong)}")
    features = ImageFeatures(features.features, features.weights_sha256, features.resolution, None,
                             features.resize, features.name, features.fingerprint)  # a reference needs no logits
    save_features(features, path)
    return features
