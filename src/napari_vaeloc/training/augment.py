"""Random augmentation of model-space training slices (pure torch, batched).

Training on a single healthy template needs augmentation to stand in for subject variety. An
:class:`Augmenter` takes a batch ``x`` of model-space slices, shape (B, C, H, W) (normally
(B, 1, S, S) from :func:`napari_vaeloc.preprocess.volume_to_slices`: foreground z-scores clipped
to ``clip``, background/padding at ``background``) and applies, in this order:

1. mirror along dim 2 (the first in-plane axis: left-right for axial and coronal slices);
2. rotation + scaling + a smooth elastic displacement, in one ``grid_sample`` (bilinear); areas
   that come from outside the image are filled with ``background``;
3. simulated lower resolution (antialiased downsampling, bilinear upsampling back);
4. intensity transforms on the foreground only (pixels above ``background + FOREGROUND_EPS``):
   multiplicative bias field, gamma and brightness, all in the unit range where ``clip`` maps
   to [0, 1] (so the darkest value stays fixed), then Gaussian noise in z-units;
5. clipping back into ``clip``.

Every random number comes from the ``generator`` passed in, so the same generator state gives
the same output. An ``Augmenter`` is a drop-in ``augment`` for :func:`loop.fit` (whose default,
:data:`loop.FLIP_ONLY`, is one that only mirrors).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

#: pixels within this distance (z-units) of ``background`` count as background
FOREGROUND_EPS = 1e-3

_PAIRS = ("scale", "gamma", "brightness", "resolution", "clip")
_PROBS = (
    "flip_p",
    "affine_p",
    "elastic_p",
    "bias_field_p",
    "gamma_p",
    "brightness_p",
    "noise_p",
    "resolution_p",
)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of :class:`Augmenter`. Each ``*_p`` is the probability (per slice, drawn
    independently) that the transform is applied; ranges are (low, high), sampled uniformly per
    slice unless stated otherwise.

    Attributes:
        flip_p: probability of a mirror along dim 2, the first in-plane axis of the slices
            (left-right in RAS+ axial and coronal slices). Default 0.5.
        affine_p: probability of a random rotation + scaling. Default 1.0.
        rotation: rotation angle in radians; a number r means uniform in [-r, r], a pair
            (low, high) means uniform in [low, high] (a collapsed pair gives a fixed angle).
            Positive angles turn like ``torch.rot90(x, 1, dims=(2, 3))`` (counter-clockwise
            when dim 2 is shown as rows, top to bottom). Default 0.1.
        scale: range of the zoom factor (unitless; > 1 magnifies the content about the image
            centre). Default (0.9, 1.2).
        elastic_p: probability of an elastic deformation. Default 0.5.
        elastic_alpha: maximum displacement in pixels; each deformed slice gets a field whose
            largest displacement length is uniform in [0, elastic_alpha]. Default 2.0.
        elastic_sigma: smoothness in pixels: standard deviation of the Gaussian that smooths the
            white-noise displacement field. Default 5.0.
        bias_field_p: probability of a multiplicative bias field. Default 0.5.
        bias_field: maximum relative amplitude (unitless, in [0, 1)) of the smooth field
            ``1 + a * p(x, y)``, ``p`` a random cubic polynomial scaled to max |p| = 1 over the
            slice and ``a`` uniform in [0, bias_field]. Default 0.15.
        gamma_p: probability of a gamma change. Default 0.5.
        gamma: range of the exponent g in ``u ** g`` (unitless, sampled log-uniformly; g > 1
            darkens). Default (0.8, 1.25).
        brightness_p: probability of a brightness change. Default 1.0.
        brightness: range of the multiplicative brightness factor (unitless). Default
            (0.95, 1.1).
        noise_p: probability of additive Gaussian noise. Default 0.5.
        noise_std: maximum noise standard deviation in z-units; the std is uniform in
            [0, noise_std]. Default 0.05.
        resolution_p: probability of a simulated lower resolution. Default 0.25.
        resolution: range of the downsampling factor (unitless, >= 1; 1.5 means the slice is
            resampled to 1/1.5 of its size and back). Default (1.0, 1.5).
        clip: (low, high) bounds in z-units that outputs are clipped into; ``low`` maps to 0 and
            ``high`` to 1 for the bias field, gamma and brightness. Default (-1.5, 1.5).
        background: value (z-units) of background and padding, used for areas that come from
            outside the image; intensity transforms and noise leave pixels at or below
            ``background + FOREGROUND_EPS`` unchanged. It should equal the slices' pad value.
            Default -1.5.
    """

    flip_p: float = 0.5
    affine_p: float = 1.0
    rotation: float | tuple[float, float] = 0.1
    scale: tuple[float, float] = (0.9, 1.2)
    elastic_p: float = 0.5
    elastic_alpha: float = 2.0
    elastic_sigma: float = 5.0
    bias_field_p: float = 0.5
    bias_field: float = 0.15
    gamma_p: float = 0.5
    gamma: tuple[float, float] = (0.8, 1.25)
    brightness_p: float = 1.0
    brightness: tuple[float, float] = (0.95, 1.1)
    noise_p: float = 0.5
    noise_std: float = 0.05
    resolution_p: float = 0.25
    resolution: tuple[float, float] = (1.0, 1.5)
    clip: tuple[float, float] = (-1.5, 1.5)
    background: float = -1.5

    def __post_init__(self) -> None:
        for name in _PAIRS:
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not value[0] <= value[1]:
                raise ValueError(f"{name} must be a (low, high) pair with low <= high")
            object.__setattr__(self, name, value)
        rot = self.rotation
        if isinstance(rot, (int, float)):
            rot = float(rot)
            if rot < 0:
                raise ValueError("rotation must be >= 0 (or a (low, high) pair)")
        else:
            rot = tuple(float(v) for v in rot)
            if len(rot) != 2 or not rot[0] <= rot[1]:
                raise ValueError("rotation must be a number or a (low, high) pair")
        object.__setattr__(self, "rotation", rot)
        for name in _PROBS:
            p = float(getattr(self, name))
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], not {p}")
            object.__setattr__(self, name, p)
        checks = {
            "scale": self.scale[0] > 0,
            "gamma": self.gamma[0] > 0,
            "brightness": self.brightness[0] >= 0,
            "resolution": self.resolution[0] >= 1,
            "clip": self.clip[0] < self.clip[1],
            "elastic_alpha": self.elastic_alpha >= 0,
            "elastic_sigma": self.elastic_sigma > 0,
            "bias_field": 0 <= self.bias_field < 1,
            "noise_std": self.noise_std >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid augmentation parameter(s): {', '.join(bad)}")
        for name in ("elastic_alpha", "elastic_sigma", "bias_field", "noise_std", "background"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def none(cls) -> AugmentConfig:
        """A configuration that disables every transform (the augmenter returns a copy)."""
        neutral = {"rotation": 0.0, "elastic_alpha": 0.0, "bias_field": 0.0, "noise_std": 0.0}
        neutral.update(dict.fromkeys(("scale", "gamma", "brightness", "resolution"), (1.0, 1.0)))
        return cls(**dict.fromkeys(_PROBS, 0.0), **neutral)

    @property
    def rotation_range(self) -> tuple[float, float]:
        """The rotation range (low, high) in radians."""
        r = self.rotation
        return (-r, r) if isinstance(r, float) else r

    # which transforms can change anything
    @property
    def _flip(self) -> bool:
        return self.flip_p > 0

    @property
    def _affine(self) -> bool:
        return self.affine_p > 0 and (self.rotation_range != (0.0, 0.0) or self.scale != (1, 1))

    @property
    def _elastic(self) -> bool:
        return self.elastic_p > 0 and self.elastic_alpha > 0

    @property
    def _resolution(self) -> bool:
        return self.resolution_p > 0 and self.resolution[1] > 1

    @property
    def _bias(self) -> bool:
        return self.bias_field_p > 0 and self.bias_field > 0

    @property
    def _gamma(self) -> bool:
        return self.gamma_p > 0 and self.gamma != (1, 1)

    @property
    def _brightness(self) -> bool:
        return self.brightness_p > 0 and self.brightness != (1, 1)

    @property
    def _noise(self) -> bool:
        return self.noise_p > 0 and self.noise_std > 0

    @property
    def is_identity(self) -> bool:
        """True when no transform is active (see :meth:`none`)."""
        return not (
            self._flip
            or self._affine
            or self._elastic
            or self._resolution
            or self._bias
            or self._gamma
            or self._brightness
            or self._noise
        )

    def to_dict(self) -> dict:
        """JSON-serialisable dict (pairs as lists), the inverse of :meth:`from_dict`."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        """Build from :meth:`to_dict` output; missing keys take defaults, unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown augmentation parameter(s): {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------- helpers


def _rand(n: int, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """(n,) uniform [0, 1) numbers from ``generator``, moved to ``device``/``dtype``."""
    return torch.rand(n, generator=generator, device=generator.device).to(device, dtype)


def _randn(shape: tuple[int, ...], generator: torch.Generator, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device, dtype)


def _coin(n: int, p: float, generator: torch.Generator, device) -> torch.Tensor:
    """(n,) bool, each True with probability ``p``."""
    return torch.rand(n, generator=generator, device=generator.device).to(device) < p


def _uniform(n: int, lo: float, hi: float, generator, device, dtype) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, generator, device, dtype)


def _gaussian_matrix(size: int, sigma: float, device=None) -> torch.Tensor:
    """(size, K) float32 weights exp(-(i - c_k)^2 / 2 sigma^2) of pixel i on noise points c_k
    spaced sigma apart, at least 0.5 px (the summed variance then ripples by ~2 exp(-pi^2) ~ 1e-4:
    stationary), covering the image plus 3 sigma on each side so there are no edge effects."""
    step = max(sigma, 0.5)
    centres = torch.arange(-3 * sigma, size - 1 + 3 * sigma + step, step, dtype=torch.float64)
    i = torch.arange(size, dtype=torch.float64)
    g = torch.exp(-0.5 * ((i[:, None] - centres[None, :]) / sigma) ** 2)
    return g.to(device=device, dtype=torch.float32)


def _smooth_field(
    n: int, a_h: torch.Tensor, a_w: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Smooth random displacement fields ``a_h @ Z @ a_w.T``, (n, 2, H, W) in pixels, channels
    (dim 2, dim 3), for ``_gaussian_matrix`` weights ``a_h``, ``a_w``.

    Gaussian-smoothed white noise: independent normal weights ``Z`` on points ``sigma`` apart,
    each spread by a Gaussian of std ``sigma`` pixels. Each field is scaled so its longest
    displacement vector has length 1 (multiply by the amplitude in pixels); its spatial
    derivatives are then of order 1 / ``sigma`` per pixel.
    """
    z = _randn((n, 2, a_h.shape[1], a_w.shape[1]), generator, a_h.device, a_h.dtype)
    field = a_h @ z @ a_w.T
    longest = field.square().sum(dim=1).amax(dim=(1, 2)).sqrt().clamp_min(1e-12)
    return field / longest.view(n, 1, 1, 1)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (n, C, h, w), align_corners=False)`` for (n, 2, 3) ``theta``,
    computed elementwise (several times faster on CPU than the batched matmul)."""
    dev, dt = theta.device, theta.dtype
    gx = ((torch.arange(w, device=dev, dtype=dt) + 0.5) * (2 / w) - 1).view(1, 1, w, 1)
    gy = ((torch.arange(h, device=dev, dtype=dt) + 0.5) * (2 / h) - 1).view(1, h, 1, 1)
    cols = [theta[:, :, k].reshape(-1, 1, 1, 2) for k in range(3)]
    # two small (n, 1, W, 2) and (n, H, 1, 2) parts, one broadcast add
    return torch.addcmul(cols[2], cols[0], gx) + cols[1] * gy


def _poly_basis(h: int, w: int, device, dtype, degree: int = 3) -> torch.Tensor:
    """(K, H, W) monomials a^i b^j, 0 < i + j <= degree, over [-1, 1]^2 pixel centres."""
    a = (torch.arange(h, device=device, dtype=dtype) + 0.5) * (2 / h) - 1
    b = (torch.arange(w, device=device, dtype=dtype) + 0.5) * (2 / w) - 1
    terms = [
        a.view(-1, 1) ** i * b.view(1, -1) ** j
        for i in range(degree + 1)
        for j in range(degree + 1 - i)
        if i + j > 0
    ]
    return torch.stack(terms)


def _bias_from_basis(n: int, basis: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, H, W) random smooth fields ``p`` over the (K, H, W) ``basis``, each scaled to
    max |p| = 1; the bias field is ``1 + a * p``."""
    coef = _randn((n, basis.shape[0]), generator, basis.device, basis.dtype)
    p = torch.einsum("nk,khw->nhw", coef, basis)
    p = p / p.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return p.unsqueeze(1)


# ----------------------------------------------------------------------------- augmenter


class Augmenter:
    """Random spatial and intensity augmentation of model-space slices.

    ``Augmenter(cfg)(x, generator)`` maps a (B, C, H, W) float tensor to a new tensor of the same
    shape, dtype and device (the input is never modified); see :class:`AugmentConfig` and the
    module docstring. All randomness is drawn from ``generator`` (on its own device).
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config if config is not None else AugmentConfig()
        self._cache: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"Augmenter({self.config!r})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a (B, C, H, W) batch; returns a new tensor."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
        cfg = self.config
        out = x.clone()
        if cfg.is_identity or x.shape[0] == 0:
            return out
        if cfg._flip:
            m = _coin(x.shape[0], cfg.flip_p, generator, x.device)
            out = torch.where(m.view(-1, 1, 1, 1), out.flip(2), out)
        if cfg._affine or cfg._elastic:
            out = self._spatial(out, generator)
        if cfg._resolution:
            out = self._lower_resolution(out, generator)
        if cfg._bias or cfg._gamma or cfg._brightness or cfg._noise:
            out = self._intensity(out, generator)
        return out.clamp_(*cfg.clip)

    def _elastic(self, n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        sigma = self.config.elastic_sigma
        dev = gen.device
        a_h = self._cached(("gauss", h, sigma, dev), lambda: _gaussian_matrix(h, sigma, dev))
        a_w = self._cached(("gauss", w, sigma, dev), lambda: _gaussian_matrix(w, sigma, dev))
        return _smooth_field(n, a_h, a_w, gen)

    def _spatial(self, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        b, _, h, w = out.shape
        dev, dt = out.device, out.dtype
        never = torch.zeros(b, dtype=torch.bool, device=dev)
        use_aff = _coin(b, cfg.affine_p, gen, dev) if cfg._affine else never
        use_ela = _coin(b, cfg.elastic_p, gen, dev) if cfg._elastic else never
        idx = torch.nonzero(use_aff | use_ela).flatten()
        n = idx.numel()
        if n == 0:
            return out
        theta = torch.zeros(n, 2, 3, device=dev, dtype=dt)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        if cfg._affine:
            lo, hi = cfg.rotation_range
            ang = _uniform(b, lo, hi, gen, dev, dt)[idx]
            zoom = _uniform(b, *cfg.scale, gen, dev, dt)[idx]
            keep = ~use_aff[idx]
            ang = ang.masked_fill(keep, 0.0)
            zoom = zoom.masked_fill(keep, 1.0)
            cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
            # rotation in pixel units, expressed in affine_grid's normalised (x=dim 3, y=dim 2)
            theta[:, 0, 0] = cos
            theta[:, 0, 1] = -sin * (h / w)
            theta[:, 1, 0] = sin * (w / h)
            theta[:, 1, 1] = cos
        grid = _affine_grid(theta, h, w)
        if cfg._elastic:
            sel = torch.nonzero(use_ela[idx]).flatten()
            if sel.numel():
                amp = cfg.elastic_alpha * _rand(sel.numel(), gen, dev, dt)
                disp = self._elastic(sel.numel(), h, w, gen).to(dev, dt)
                # pixels -> normalised units; grid's last axis is (x = dim 3, y = dim 2)
                to_norm = torch.tensor([2 / h, 2 / w], device=dev, dtype=dt).view(1, 2, 1, 1)
                offs = (disp * (amp.view(-1, 1, 1, 1) * to_norm)).flip(1).permute(0, 2, 3, 1)
                grid = grid + offs if sel.numel() == n else grid.index_add(0, sel, offs)
        # shifted so that zero padding fills with background and all-background
        # neighbourhoods stay exactly at background
        bg = cfg.background
        src = out if n == b else out[idx]
        warped = F.grid_sample(
            src - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        ).add_(bg)
        return warped if n == b else out.index_copy(0, idx, warped)

    def _cached(self, key: tuple, make) -> torch.Tensor:
        """Constant tensors (Gaussian and polynomial bases, resampling matrices) by key."""
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def _resample_matrices(self, size: int, smallest: int, device, dtype) -> torch.Tensor:
        """(size - smallest + 1, size, size): row k is the 1D operator ``up(down(.))`` through
        ``size - k`` samples (bilinear, antialiased when shrinking, as ``F.interpolate``)."""

        def make() -> torch.Tensor:
            # resizing only dim 2 of an identity image gives the operator's matrix (width-1
            # images trip up the antialiased kernel, hence square ones)
            eye = torch.eye(size, dtype=torch.float64)[None, None]
            mats = []
            for s in range(size, smallest - 1, -1):
                down = F.interpolate(
                    eye, size=(s, size), mode="bilinear", align_corners=False, antialias=True
                )[0, 0]  # (s, size)
                small_eye = torch.eye(s, dtype=torch.float64)[None, None]
                up = F.interpolate(small_eye, size=(size, s), mode="bilinear", align_corners=False)
                mats.append(up[0, 0] @ down)
            return torch.stack(mats).to(device, dtype)

        return self._cached(("resample", size, smallest, device, dtype), make)

    def _lower_resolution(self, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        b, _, h, w = out.shape
        dev, dt = out.device, out.dtype
        use = _coin(b, cfg.resolution_p, gen, "cpu")  # bookkeeping on the CPU, in float64
        factor = _uniform(b, *cfg.resolution, gen, "cpu", torch.float64)
        hs = torch.clamp((h / factor).round(), 1, h).long()
        ws = torch.clamp((w / factor).round(), 1, w).long()
        keep = torch.nonzero(use & ((hs < h) | (ws < w))).flatten()
        if keep.numel() == 0:
            return out
        idx, hs, ws = keep.to(dev), hs[keep].to(dev), ws[keep].to(dev)
        h_min = max(1, round(h / cfg.resolution[1]))
        w_min = max(1, round(w / cfg.resolution[1]))
        m_h = self._resample_matrices(h, h_min, dev, dt)[h - hs]  # (n, H, H)
        m_w = self._resample_matrices(w, w_min, dev, dt)[w - ws]  # (n, W, W)
        bg = cfg.background  # shifted: all-background rows stay exactly at background
        low = m_h.unsqueeze(1) @ (out[idx] - bg) @ m_w.transpose(1, 2).unsqueeze(1)
        return out.index_copy(0, idx, low.add_(bg))

    def _intensity(self, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        b, _, h, w = out.shape
        dev, dt = out.device, out.dtype
        lo, hi = cfg.clip
        fg = out > cfg.background + FOREGROUND_EPS
        field = bright = None  # (B, 1, H, W) and (B, 1, 1, 1) factors
        gamma_idx = expo = None  # (n,) samples and their (n, 1, 1, 1) exponents
        touched = torch.zeros(b, dtype=torch.bool, device=dev)
        if cfg._bias:
            m = _coin(b, cfg.bias_field_p, gen, dev)
            amp = (cfg.bias_field * _rand(b, gen, dev, dt)).masked_fill(~m, 0.0)
            idx = torch.nonzero(m).flatten()
            if idx.numel():
                basis = self._cached(("poly", h, w, dev, dt), lambda: _poly_basis(h, w, dev, dt))
                shape = _bias_from_basis(idx.numel(), basis, gen)
                p = torch.zeros(b, 1, h, w, device=dev, dtype=dt).index_copy(0, idx, shape)
                field = 1 + amp.view(-1, 1, 1, 1) * p
            touched |= m
        if cfg._gamma:
            m = _coin(b, cfg.gamma_p, gen, dev)
            g = torch.exp(_uniform(b, *(math.log(v) for v in cfg.gamma), gen, dev, dt))
            gamma_idx = torch.nonzero(m).flatten()
            expo = g[gamma_idx].view(-1, 1, 1, 1)
            touched |= m
        if cfg._brightness:
            m = _coin(b, cfg.brightness_p, gen, dev)
            f = _uniform(b, *cfg.brightness, gen, dev, dt).masked_fill(~m, 1.0)
            bright = f.view(-1, 1, 1, 1)
            touched |= m
        if bool(touched.any()):
            # unit range: clip low -> 0, clip high -> 1; bias field, then gamma, then brightness
            u = (out - lo).mul_(1 / (hi - lo)).clamp_(0, 1)
            if field is not None:
                u = u.mul_(field).clamp_(0, 1)
            if gamma_idx is not None and gamma_idx.numel():
                u = u.index_copy_(0, gamma_idx, u[gamma_idx].pow_(expo))
            if bright is not None:
                u = u.mul_(bright)
            new = u.mul_(hi - lo).add_(lo)
            out = torch.where(fg & touched.view(-1, 1, 1, 1), new, out)
        if cfg._noise:
            m = _coin(b, cfg.noise_p, gen, dev)
            std = (cfg.noise_std * _rand(b, gen, dev, dt)).masked_fill(~m, 0.0)
            idx = torch.nonzero(m).flatten()
            if idx.numel():
                noise = _randn((idx.numel(), *out.shape[1:]), gen, dev, dt)
                sub = out[idx]
                noisy = torch.addcmul(sub, noise, std[idx].view(-1, 1, 1, 1))
                out = out.index_copy(0, idx, torch.where(fg[idx], noisy, sub))
        return out
