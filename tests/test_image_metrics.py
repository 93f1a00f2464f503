"""FID, KID, IS and precision/recall through the real loading code of torch-fidelity and torchmetrics, on an
Inception file with random weights (the real one cannot be downloaded here). Random weights make the numbers
meaningless as quality, but not as distances: the same images must be at distance 0, and a shifted
distribution must be much farther than another draw of the same one."""

import importlib.util
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch

from ldm.evaluation.image_metrics import (
    ImageFeatures,
    InceptionFeatures,
    ReferenceSet,
    check_comparable,
    check_enough_images,
    features_metadata,
    fid,
    image_metrics,
    inception_score,
    kid,
    load_features,
    precision_recall,
    reference_features,
    result,
    save_features,
    to_uint8,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNT = 16  # images per set: enough for every metric at 64-d features (PR's nearest_k 5 needs 7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the whole module, its module-scoped fixtures included: on a busy 2-core machine two
    threads spin-wait on each other (the KID of two 16-image sets took 5.7 s with two, 0.2 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def extractor(inception_file):
    return InceptionFeatures(inception_file, feature_size=64, with_logits=False)


def noise(seed: int, low: int = 0, count: int = COUNT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, 256, (count, 3, 32, 32), generator=generator, dtype=torch.uint8)


@pytest.fixture(scope="module")
def feature_sets(extractor):
    """A reference set of uniform noise, another draw of it, and noise shifted to the upper half of the range."""
    return dict(reference=extractor(noise(0), name="reference", progress=False),
                same_distribution=extractor(noise(1), progress=False),
                shifted=extractor(noise(2, low=128), progress=False))


def test_torchmetrics_imports_without_torchvision():
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here, so the shim rightly leaves torch_fidelity alone")
    script = ("import sys, ldm.evaluation.torchmetrics_import\n"
              "from torchmetrics.image.fid import FrechetInceptionDistance\n"
              "from torchmetrics.image.kid import KernelInceptionDistance\n"
              "from torchmetrics.image.inception import InceptionScore\n"
              "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
              "assert not hasattr(sys.modules['torch_fidelity'], 'calculate_metrics'), 'the package __init__ ran'\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_distances_order_same_images_draws_and_shifted_distributions(feature_sets):
    reference, same_distribution, shifted = feature_sets.values()
    same = fid(reference, reference)
    assert abs(same.value) < 1e-3
    near, far = fid(reference, same_distribution), fid(reference, shifted)
    assert far.value > 10 * near.value > 0
    near_kid, far_kid = kid(reference, same_distribution), kid(reference, shifted)
    assert far_kid.value > 0.05 > near_kid.value
    assert near_kid.std is not None and near_kid.std >= 0
    # The random file carries the standard name but not the standard hash; 64-d is not the standard layer either.
    assert not same.standard and same.name == "FID (non-standard Inception weights, 64-d features)"


def test_precision_recall_density_coverage(feature_sets):
    reference, same_distribution, shifted = feature_sets.values()
    identical = precision_recall(reference, reference)
    assert {name: value.value for name, value in identical.items()} == pytest.approx(
        dict(precision=1, recall=1, density=1, coverage=1))
    for generated in (same_distribution, shifted):
        values = {name: value.value for name, value in precision_recall(reference, generated).items()}
        assert all(0 <= values[name] <= 1 for name in ("precision", "recall", "coverage")), values
        assert values["density"] >= 0  # not bounded by 1: it counts neighbourhoods per generated image, over k
    assert precision_recall(reference, shifted)["precision"].value < identical["precision"].value


def test_standard_weights_and_layer_give_the_plain_name(feature_sets):
    made = feature_sets["reference"]
    standard = ImageFeatures(torch.zeros(4, 2048), "6726825d" + "0" * 56, made.resolution)
    plain = result("fid", "FID", 1.0, None, standard)
    assert plain.name == "FID" and plain.standard
    other = ImageFeatures(torch.zeros(4, 2048), "ab" * 32, made.resolution, logits=torch.zeros(4, 1008))
    assert result("inception_score", "IS", 1, 0, other, uses_pool_features=False).name == \
        "IS (non-standard Inception weights)"


def test_reference_cache_round_trips_and_refuses_other_settings(extractor, feature_sets, tmp_path):
    reference = ReferenceSet("noise", fingerprint="seed 0", count=COUNT, resolution=32)
    built = reference_features(noise(0), reference, extractor, tmp_path, progress=False)
    assert torch.equal(built.features, feature_sets["reference"].features)
    (cache_file,) = tmp_path.glob("noise-*.safetensors")

    def must_not_be_read():
        raise AssertionError("the cached reference set was recomputed")
        yield

    cached = reference_features(must_not_be_read(), reference, extractor, tmp_path)
    assert torch.equal(cached.features, built.features) and cached.fingerprint == "seed 0"
    assert features_metadata(cached) == features_metadata(built)

    with pytest.raises(ValueError, match="declared with count 17 but the images gave 16"):
        reference_features(noise(0), ReferenceSet("noise", "seed 0", 17, 32), extractor, tmp_path, progress=False)
    # A file at the key's path that says it was made otherwise (edited, or written by other code) is refused.
    save_features(ImageFeatures(built.features, built.weights_sha256, built.resolution, fingerprint="seed 1",
                                name="noise"), cache_file)
    with pytest.raises(ValueError, match="made with other settings: fingerprint 'seed 1', expected 'seed 0'"):
        reference_features(must_not_be_read(), reference, extractor, tmp_path)

    generated = feature_sets["same_distribution"]
    differing = dict(
        count=ImageFeatures(generated.features[:8], generated.weights_sha256, generated.resolution),
        feature_size=ImageFeatures(torch.randn(COUNT, 192), generated.weights_sha256, generated.resolution),
        resolution=ImageFeatures(generated.features, generated.weights_sha256, (64, 64)),
        weights_sha256=ImageFeatures(generated.features, "6726825d" + "0" * 56, generated.resolution))
    for setting, other in differing.items():
        for metric in (fid, kid, precision_recall):
            with pytest.raises(ValueError, match=f"cannot be compared, they differ in {setting} "):
                metric(built, other)
    check_comparable(load_features(cache_file), generated)  # the loaded settings are those it was made with


def test_clear_errors_before_work(inception_file, extractor, feature_sets, tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        InceptionFeatures(str(missing))
    wrong_keys = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong_keys)
    with pytest.raises(ValueError, match=f"(?s){wrong_keys} does not fit torch-fidelity's Inception-v3.*Missing key"):
        InceptionFeatures(str(wrong_keys), feature_size=64)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2], not_a_state_dict)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        InceptionFeatures(str(not_a_state_dict))
    with pytest.raises(ValueError, match="feature_size 100 is not one of"):
        InceptionFeatures(inception_file, feature_size=100)

    images = torch.rand(3, 3, 8, 8)
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"images \[1\] of the batch hold NaN"):
        extractor(images)
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        to_uint8(torch.full((1, 3, 4, 4), 1.5))
    with pytest.raises(ValueError, match=r"must be an \(N, 3, H, W\) tensor, got \(1, 1, 4, 4\)"):
        to_uint8(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"change resolution from \(8, 8\) to \(16, 16\)"):
        extractor(iter([noise(0, count=1)[..., :8, :8], noise(0, count=1)[..., :16, :16]]), progress=False)

    reference = feature_sets["reference"]
    one = ImageFeatures(reference.features[:1], reference.weights_sha256, reference.resolution)
    with pytest.raises(ValueError, match="FID needs at least 2 images per set, got 1"):
        fid(one, one)
    with pytest.raises(ValueError, match=f"KID subset_size 17 must lie between 2 and the {COUNT} images"):
        kid(reference, reference, subset_size=17)
    with pytest.raises(ValueError, match="nearest_k 20 need at least 22 images per set, got 16"):
        precision_recall(reference, reference, nearest_k=20)
    with pytest.raises(ValueError, match="made without logits"):
        inception_score(reference)
    with pytest.raises(ValueError, match="4 images per set are too few: KID .* needs 8, .*Inception Score .* 10"):
        check_enough_images(4, kid_subset_size=8)


def test_float_images_are_rounded_not_truncated():
    images = torch.full((1, 3, 2, 2), 100.6 / 255)
    assert to_uint8(images).unique().tolist() == [101]  # (x * 255).byte(), torchmetrics' normalize=True, gives 100


def test_every_metric_from_the_local_file_without_network(inception_file, monkeypatch):
    """The loaders run with every way out patched to fail: only the local file can give the weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    def no_network(*args, **kwargs):
        raise AssertionError(f"tried to reach the network: {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(inception, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)

    # 64-d features and the logits: the whole network runs, so few images. Solid colours as the generated set,
    # since noise images all get the same class probabilities and an Inception Score of exactly 1.
    features = InceptionFeatures(inception_file, feature_size=64, with_logits=True)
    colours = torch.randint(0, 256, (6, 3, 1, 1), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    reference = features(noise(0, count=6), progress=False)
    generated = features(colours.expand(6, 3, 32, 32), progress=False)
    assert generated.features.shape == (6, 64) and generated.logits.shape == (6, 1008)
    rng_before = torch.get_rng_state()
    results = image_metrics(reference, generated, nearest_k=3, splits=2, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeding the metrics left the caller's RNG alone
    assert set(results) == {"fid", "kid", "precision", "recall", "density", "coverage", "inception_score"}
    assert all(torch.isfinite(torch.tensor(value.value)) for value in results.values())
    assert all(not value.standard and "non-standard Inception weights" in value.name for value in results.values())
    score = results["inception_score"]
    assert score.value > 1 and score == inception_score(generated, splits=2, seed=7)
    assert inception_score(generated, splits=2, seed=8).value != score.value  # the seed reaches the shuffle
    assert abs(fid(reference, reference).value) < 1e-3


def test_standard_layer_same_images_fid_is_zero(inception_file):
    """At the standard 2048-d layer. The costliest test here: torchmetrics' FID takes the eigenvalues of a general
    2048 x 2048 product, some 5 s on one thread whatever the number of images."""
    features = InceptionFeatures(inception_file, with_logits=False)(noise(0, count=4), progress=False)
    same = fid(features, features)
    assert abs(same.value) < 1e-3 and same.name == "FID (non-standard Inception weights)"
