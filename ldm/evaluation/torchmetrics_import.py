"""torchmetrics, importable without torchvision. Every module of the project imports torchmetrics through here.

torchmetrics' image metrics take their Inception network from torch-fidelity, which the Makefile installs
with --no-deps because it declares torchvision (no build of it works beside our CPU torch). torchmetrics
imports only torch-fidelity's Inception submodules, which need nothing but torch, but importing any submodule
first runs the package's `__init__`, and that imports torchvision through torch-fidelity's CLIP extractor: so
a plain `import torchmetrics` fails with ModuleNotFoundError. Registering an empty package module under the
same name, with the real package's search path, before torchmetrics is first imported, lets Python import
those submodules while the package's `__init__` never runs. Where torchvision does import, nothing is changed.
"""

import importlib.util
import sys
import types


def torchvision_importable() -> bool:
    """Whether `import torchvision` works here: installed is not enough, a torchvision built for another torch
    fails to import ("operator torchvision::nms does not exist")."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # any failure of its import means we cannot use it: RuntimeError, ImportError, OSError
        return False
    return True


def register_torch_fidelity_stub() -> bool:
    """Put an empty `torch_fidelity` package into sys.modules, so that its submodules import without its
    `__init__`. Returns whether it did: not when torch-fidelity is missing or already imported."""
    if "torch_fidelity" in sys.modules:
        return False
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or spec.submodule_search_locations is None:
        return False
    stub = types.ModuleType("torch_fidelity", "torch-fidelity's submodules, without its package __init__")
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__spec__ = spec
    stub.__package__ = "torch_fidelity"
    sys.modules["torch_fidelity"] = stub
    return True


if "torchmetrics" not in sys.modules and not torchvision_importable():
    register_torch_fidelity_stub()

# What the project uses, imported after the stub is in place:
# - torch-fidelity's extractor rather than torchmetrics' NoTrainInceptionV3 subclass of it, because its forward
#   returns several feature layers from one pass (pool features and logits), and always resizes as TF did;
# - CLIPScore's per-pair step, private: what CLIPScore.update sums, kept per pair by clip_score.py. torchmetrics
#   is pinned in constraints.txt, so it cannot move under us.
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402
from torchmetrics.functional.multimodal.clip_score import _clip_score_update as clip_score_update  # noqa: E402
from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: E402
from torchmetrics.image.inception import InceptionScore  # noqa: E402
from torchmetrics.image.kid import KernelInceptionDistance  # noqa: E402
from torchmetrics.multimodal.clip_score import CLIPScore  # noqa: E402

__all__ = [
    "CLIPScore",
    "FeatureExtractorInceptionV3",
    "FrechetInceptionDistance",
    "InceptionScore",
    "KernelInceptionDistance",
    "clip_score_update",
]
