"""Names of the maps, scores and slicing axes (no torch here, so fronts can import them cheaply)."""

from collections.abc import Iterable, Sequence

from .errors import InputError

#: per-pixel maps computed in model space (see ``scoring``)
PIXEL_MAPS = (
    "rec_error",
    "rec_error_smooth",
    "sq_error",
    "kl_grad",
    "rec_grad",
    "elbo_grad",
    "combi",
    "kl_grad_sg",
    "elbo_grad_sg",
    "restoration",
)
#: maps that need SmoothGrad's extra gradient passes
SMOOTHGRAD_MAPS = ("kl_grad_sg", "elbo_grad_sg")
#: maps that need the restoration's extra gradient passes
RESTORATION_MAPS = ("restoration",)
#: per-slice scores (nats)
SLICE_SCORES = ("kl", "rec", "elbo")
#: maps a localization returns: the pixel maps plus the reconstruction in scan units
OUTPUT_MAPS = (*PIXEL_MAPS, "reconstruction")
#: maps a localization returns unless asked for others (SmoothGrad costs two extra passes, the
#: restoration four)
DEFAULT_MAPS = tuple(m for m in OUTPUT_MAPS if m not in (*SMOOTHGRAD_MAPS, *RESTORATION_MAPS))
#: the maps evaluated by default (sq_error ranks voxels like rec_error, so it is left out)
EVALUATED_MAPS = ("rec_error", "rec_error_smooth", "kl_grad", "rec_grad", "elbo_grad", "combi")
#: maps offered as weight sliders in the widget, in display order
SLIDER_MAPS = ("restoration", "rec_error_smooth", "rec_error", "elbo_grad", "kl_grad", "combi")
#: maps that may be weighted into the combined map (every pixel map)
COMBINABLE_MAPS = PIXEL_MAPS
#: the named combinations of ``combine.CombineSettings.preset``
PRESETS = ("default", "paper")
#: slicing axis -> its voxel axis in RAS+ canonical order (sagittal slices cut left-right, etc.)
AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
#: the slicing axes in the order fronts offer them
AXIS_NAMES = ("axial", "coronal", "sagittal")


def check_names(names: Iterable[str], allowed: Sequence[str], what: str = "maps") -> None:
    """Refuse names outside ``allowed`` with one line that lists the valid ones.

    Raises:
        InputError: some of ``names`` are not in ``allowed``.
    """
    unknown = [n for n in dict.fromkeys(names) if n not in allowed]
    if unknown:
        raise InputError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")


#: the precisions maps can be kept in (``EngineOptions.map_dtype``, ``--map-dtype``)
MAP_DTYPES = ("float32", "float16")
