"""Training augmentation: reproducibility, identity, ranges, geometry and intensity effects."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from napari_vaeloc.training.augment import FOREGROUND_EPS, AugmentConfig, Augmenter
from napari_vaeloc.training.loop import FLIP_ONLY

LO, HI = -1.5, 1.5
NONE = AugmentConfig.none().to_dict()
PROBS = [k for k in NONE if k.endswith("_p")]


def only(**kw) -> AugmentConfig:
    """Everything off except the given parameters."""
    return AugmentConfig.from_dict({**NONE, **kw})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brain_batch(b: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(b, 1, size, size) slices like volume_to_slices': an off-centre textured ellipse in
    [-1.5, 1.5] (some pixels clipped at both ends) on a -1.5 background."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.arange(size) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    inside = ((yy - 0.1) / 0.7) ** 2 + (xx / 0.55) ** 2 < 1
    tex = 0.8 * torch.randn(b, 1, size, size, generator=g) + torch.sin(6 * xx) + 0.3
    return torch.where(inside, tex.clamp(LO, HI), torch.tensor(LO))


def foreground_and_unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground mask of ``x`` and ``x`` in the unit range (clip low -> 0, high -> 1)."""
    return x > LO + FOREGROUND_EPS, (x - LO) / (HI - LO)


def from_unit(u: torch.Tensor) -> torch.Tensor:
    return LO + u * (HI - LO)


def ramps(h: int, w: int) -> torch.Tensor:
    """(1, 2, h, w): channel 0 holds the row index, channel 1 the column index. Bilinear
    sampling of a linear ramp is exact, so a warped ramp reads out the sampled coordinate."""
    rows = torch.arange(h, dtype=torch.float64).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float64).view(1, w).expand(h, w)
    return torch.stack((rows, cols))[None]


# a wide clip and far background so the ramps (0 .. size - 1) pass through untouched
RAMP = {"clip": [-1000.0, 1000.0], "background": -1000.0}

# strong ranges for every transform, and the intensity transforms among them
INTENSITY = {"bias_field": 0.4, "gamma": (0.5, 2.0), "brightness": (0.7, 1.4), "noise_std": 0.3}
RANGES = {
    **INTENSITY,
    **{"rotation": 0.3, "scale": (0.8, 1.3), "elastic_alpha": 3.0, "elastic_sigma": 4.0},
    "resolution": (1.0, 2.0),
}
STRONG = AugmentConfig(**dict.fromkeys(PROBS, 1.0), **RANGES)


def test_none_is_identity_and_a_copy():
    x = brain_batch()
    y = Augmenter(AugmentConfig.none())(x, gen())
    assert torch.equal(y, x)
    assert y.data_ptr() != x.data_ptr()


def test_zero_probabilities_disable_active_ranges():
    cfg = AugmentConfig(**dict.fromkeys(PROBS, 0.0), **RANGES)
    assert cfg.is_identity
    x = brain_batch()
    assert torch.equal(Augmenter(cfg)(x, gen()), x)


@pytest.mark.parametrize(
    "name",
    ["flip", "affine", "elastic", "resolution", "bias_field", "gamma", "brightness", "noise"],
)
def test_probability_applies_per_slice(name):
    """With p = 0.5 (all other transforms off) each slice is either left exactly as it was or
    changed, and about half of them are changed."""
    cfg = AugmentConfig(**{**dict.fromkeys(PROBS, 0.0), f"{name}_p": 0.5}, **RANGES)
    x = brain_batch(48)
    y = Augmenter(cfg)(x, gen(11))
    same = (y == x).flatten(1).all(dim=1)
    assert 10 <= int(same.sum()) <= 38
    assert not (y[~same] == x[~same]).flatten(1).all(dim=1).any()


@pytest.mark.parametrize("cfg", [AugmentConfig(), STRONG], ids=["default", "strong"])
def test_reproducible_from_generator_only(cfg):
    x = brain_batch(16)
    aug = Augmenter(cfg)
    torch.manual_seed(1)
    a = aug(x, gen(7))
    torch.manual_seed(2)  # the global RNG must not matter
    b = aug(x, gen(7))
    c = aug(x, gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_range_shape_dtype_and_input_untouched(dtype):
    x = brain_batch(16).to(dtype)
    x_before = x.clone()
    y = Augmenter(STRONG)(x, gen(3))
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(x, x_before)
    assert float(y.min()) >= LO and float(y.max()) <= HI
    assert torch.isfinite(y).all()
    # the background value survives (padding, and areas that come from outside)
    assert (y == LO).float().mean() > 0.2


def test_intensity_transforms_keep_background():
    probs = {"bias_field_p": 1.0, "gamma_p": 1.0, "brightness_p": 1.0, "noise_p": 1.0}
    cfg = only(**probs, **INTENSITY)
    x = brain_batch(16)
    x[:, :, :2] = LO + FOREGROUND_EPS / 2  # near-background, must be left alone too
    y = Augmenter(cfg)(x, gen(1))
    bg = x <= LO + FOREGROUND_EPS
    assert bg.float().mean() > 0.3
    assert torch.equal(y[bg], x[bg])
    mid = ~bg & (x < HI)  # pixels saturated at the top may stay there when brightened
    assert (y[mid] != x[mid]).float().mean() > 0.95
    assert float(y.min()) >= LO and float(y.max()) <= HI


def test_flip_p1_is_torch_flip_dim2():
    x = brain_batch(4, size=16)
    x[:, :, :3] = 1.0  # make the two in-plane axes distinguishable
    y = Augmenter(only(flip_p=1.0))(x, gen())
    assert torch.equal(y, torch.flip(x, dims=[2]))
    assert not torch.equal(y, torch.flip(x, dims=[3]))


def test_fit_default_mirrors_half_the_slices_unclipped():
    """``fit``'s default: each slice mirrored along dim 2 with probability 0.5 (one uniform draw
    per slice from the generator), nothing else; values outside the clip range pass through."""
    x = 3 * brain_batch(48, size=16)
    y = FLIP_ONLY(x, gen(2))
    mirrored = (torch.rand(48, generator=gen(2)) < 0.5).view(-1, 1, 1, 1)
    assert torch.equal(y, torch.where(mirrored, x.flip(2), x))
    assert 10 <= int(mirrored.sum()) <= 38
    assert float(y.max()) > HI


def test_quarter_turn_matches_rot90():
    x = brain_batch(3, size=16)
    y = Augmenter(only(affine_p=1.0, rotation=[math.pi / 2] * 2))(x, gen())
    torch.testing.assert_close(y, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("angle", "zoom", "h", "w"),
    [(0.1, 1.0, 32, 32), (-0.25, 1.0, 24, 40), (0.2, 1.25, 32, 32), (0.0, 0.9, 40, 24)],
)
def test_rotation_and_scale_move_content_as_documented(angle, zoom, h, w):
    """Output pixel p (pixel units, about the image centre) shows input point R(angle) p / zoom,
    so positive angles turn like rot90 and zoom > 1 magnifies; checked exactly on ramps."""
    cfg = only(affine_p=1.0, rotation=[angle, angle], scale=[zoom, zoom], **RAMP)
    y = Augmenter(cfg)(ramps(h, w), gen())[0]
    cr, cc = (h - 1) / 2, (w - 1) / 2
    r = torch.arange(h, dtype=torch.float64).view(h, 1) - cr
    c = torch.arange(w, dtype=torch.float64).view(1, w) - cc
    src_r = (math.sin(angle) * c + math.cos(angle) * r) / zoom + cr
    src_c = (math.cos(angle) * c - math.sin(angle) * r) / zoom + cc
    inside = (src_r > 0) & (src_r < h - 1) & (src_c > 0) & (src_c < w - 1)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(y[0][inside], src_r[inside], atol=1e-4, rtol=0)
    torch.testing.assert_close(y[1][inside], src_c[inside], atol=1e-4, rtol=0)
    # content pulled in from outside the image is background
    outside = (src_r < -1) | (src_r > h) | (src_c < -1) | (src_c > w)
    assert torch.all(y[:, outside] == RAMP["background"])


ALPHA = 3.0


def elastic_displacements(n: int, sigma: float, size: int = 48) -> torch.Tensor:
    """(n, 2, ., .) displacements in pixels (exact on ramps) of elastic deformations with
    amplitude ALPHA, inside a margin where the sampled points stay inside the image."""
    cfg = only(elastic_p=1.0, elastic_alpha=ALPHA, elastic_sigma=sigma, **RAMP)
    x = ramps(size, size).expand(n, 2, size, size)
    m = math.ceil(ALPHA) + 1
    return (Augmenter(cfg)(x, gen(4)) - x)[:, :, m:-m, m:-m]


def longest(disp: torch.Tensor) -> torch.Tensor:
    """(n,) the length of each slice's longest displacement vector."""
    return disp.square().sum(dim=1).sqrt().amax(dim=(1, 2))


def largest_step(disp: torch.Tensor) -> torch.Tensor:
    """(n,) the largest change of each slice's displacement between neighbouring pixels."""
    rows = (disp[:, :, 1:] - disp[:, :, :-1]).abs().amax(dim=(1, 2, 3))
    cols = (disp[:, :, :, 1:] - disp[:, :, :, :-1]).abs().amax(dim=(1, 2, 3))
    return torch.maximum(rows, cols)


def test_elastic_field_is_smooth_and_bounded_by_alpha():
    disp = elastic_displacements(6, sigma=5.0)
    assert float(longest(disp).max()) <= ALPHA + 1e-4
    assert float(longest(disp).min()) > 0.05  # every slice is deformed
    # white noise of this amplitude would jump by ~ALPHA
    assert float(largest_step(disp).max()) < 0.25 * ALPHA


def test_elastic_amplitude_is_uniform_up_to_alpha_and_roughness_follows_sigma():
    """Each field is scaled to a longest vector uniform in [0, ALPHA]; relative to that length
    it changes by about 1 / sigma per pixel."""
    smooth, rough = elastic_displacements(32, sigma=6.0), elastic_displacements(32, sigma=1.0)
    for disp in (smooth, rough):
        assert 0.8 * ALPHA < float(longest(disp).max()) <= ALPHA + 1e-4
        assert 0.3 * ALPHA < float(longest(disp).mean()) < 0.7 * ALPHA
    relative_step = [largest_step(d) / longest(d) for d in (smooth, rough)]
    assert float(relative_step[0].max()) < 0.3 < float(relative_step[1].min())


def test_gamma_changes_foreground_in_expected_direction():
    x = brain_batch(8)
    fg, u = foreground_and_unit(x)
    dark = Augmenter(only(gamma_p=1.0, gamma=(2.0, 2.0)))(x, gen())
    bright = Augmenter(only(gamma_p=1.0, gamma=(0.5, 0.5)))(x, gen())
    torch.testing.assert_close(dark[fg], from_unit(u.square())[fg])
    assert dark[fg].mean() < x[fg].mean() < bright[fg].mean()
    # the ends of the clip range stay fixed
    top = x == HI
    assert top.any() and torch.equal(dark[top], x[top])


def test_gamma_then_brightness_each_with_its_own_probability():
    x = brain_batch(24)
    fg, u = foreground_and_unit(x)
    cfg = only(gamma_p=0.5, gamma=(2.0, 2.0), brightness_p=1.0, brightness=(1.2, 1.2))
    y = Augmenter(cfg)(x, gen(3))
    bright_only = from_unit((1.2 * u).clamp(max=1))
    both = from_unit((1.2 * u.square()).clamp(max=1))  # gamma first, then brightness
    bright_only, both = torch.where(fg, bright_only, x), torch.where(fg, both, x)

    def close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b).abs() <= 1e-5).flatten(1).all(dim=1)

    is_bright, is_both = close(y, bright_only), close(y, both)
    assert torch.all(is_bright ^ is_both)
    assert 4 <= int(is_both.sum()) <= 20


def test_brightness_scales_the_unit_range():
    x = brain_batch(8)
    fg, u = foreground_and_unit(x)
    up = Augmenter(only(brightness_p=1.0, brightness=(1.2, 1.2)))(x, gen())
    down = Augmenter(only(brightness_p=1.0, brightness=(0.8, 0.8)))(x, gen())
    torch.testing.assert_close(up[fg], from_unit((1.2 * u).clamp(max=1))[fg])
    torch.testing.assert_close(down[fg], from_unit(0.8 * u)[fg])
    assert down[fg].mean() < x[fg].mean() < up[fg].mean()


def flat_slices(b: int, h: int, w: int, background_rows: int) -> torch.Tensor:
    """(b, 1, h, w) foreground at u = 0.5 (so a multiplicative field shows as it is) below
    ``background_rows`` rows of background."""
    x = torch.full((b, 1, h, w), 0.0)  # the middle of the clip range
    x[:, :, :background_rows] = LO
    return x


def bias_fields(x: torch.Tensor, a: float, rows: int) -> torch.Tensor:
    """The bias fields (amplitude up to ``a``) applied to ``flat_slices``, below ``rows``."""
    y = Augmenter(only(bias_field_p=1.0, bias_field=a))(x, gen(2))
    assert y.shape == x.shape and torch.equal(y[:, :, :rows], x[:, :, :rows])
    return (foreground_and_unit(y)[1] / 0.5)[:, :, rows:]


def test_bias_field_is_smooth_and_bounded():
    a = 0.3
    field = bias_fields(flat_slices(4, 32, 32, background_rows=4), a, rows=4)
    assert float(field.min()) >= 1 - a - 1e-5 and float(field.max()) <= 1 + a + 1e-5
    assert float(field.std(dim=(1, 2, 3)).min()) > 1e-3
    assert float((field[:, :, 1:] - field[:, :, :-1]).abs().max()) < 0.1


def test_bias_field_amplitude_is_uniform_up_to_the_maximum():
    """Each field is 1 + a p with max |p| = 1 and a uniform in [0, bias_field]; non-square."""
    a = 0.3
    field = bias_fields(flat_slices(16, 24, 40, background_rows=1), a, rows=1)
    deviation = (field - 1).abs().amax(dim=(1, 2, 3))
    assert 0.8 * a < float(deviation.max()) <= a + 1e-5
    assert 0.2 * a < float(deviation.mean()) < 0.7 * a


def test_noise_only_on_foreground_with_bounded_std():
    x = flat_slices(4, 32, 32, background_rows=8)
    y = Augmenter(only(noise_p=1.0, noise_std=0.2))(x, gen(5))
    assert torch.equal(y[:, :, :8], x[:, :, :8])
    diff = (y - x)[:, :, 8:]
    assert 0 < float(diff.std(dim=(1, 2, 3)).max()) < 0.25


@pytest.mark.parametrize("factor", [1.3, 2.0])
def test_resolution_is_down_then_up_sampling(factor):
    x = brain_batch(4, size=32)[:, :, :, 4:28].contiguous()  # non-square too
    y = Augmenter(only(resolution_p=1.0, resolution=(factor, factor)))(x, gen())
    size = (round(32 / factor), round(24 / factor))
    small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    want = F.interpolate(small, size=(32, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, want.clamp(LO, HI), atol=1e-5, rtol=0)
    assert not torch.allclose(y, x)


def test_config_round_trip_and_validation():
    for cfg in (AugmentConfig(), AugmentConfig.none(), STRONG, only(rotation=[0.1, 0.2])):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert AugmentConfig.from_dict(d) == cfg
    assert AugmentConfig.from_dict({}) == AugmentConfig()
    assert AugmentConfig().rotation_range == (-0.1, 0.1)
    with pytest.raises(ValueError, match="unknown"):
        AugmentConfig.from_dict({"rotaton": 0.1})
    for bad in ({"flip_p": 1.5}, {"scale": (1.2, 0.9)}, {"bias_field": 1.0}, {"gamma": (0, 1)}):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)


def test_drop_in_for_training():
    from napari_vaeloc.models.vae import ConvVAE
    from napari_vaeloc.training.loop import TrainConfig, fit

    torch.manual_seed(0)
    net = ConvVAE(image_size=16, widths=(8, 16), z_dim=8)
    cfg = TrainConfig(image_size=16, z_dim=8, batch_size=4, max_steps=2, val_every=1)
    res = fit(net, brain_batch(8, size=16), brain_batch(2, size=16), cfg, augment=Augmenter())
    assert len(res.history) == 2 and all(math.isfinite(h["train_loss"]) for h in res.history)
