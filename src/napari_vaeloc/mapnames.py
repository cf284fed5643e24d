"""Names of the maps and scores (no torch here, so fronts can import them cheaply)."""

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
)
#: maps that need SmoothGrad's extra gradient passes
SMOOTHGRAD_MAPS = ("kl_grad_sg", "elbo_grad_sg")
#: per-slice scores (nats)
SLICE_SCORES = ("kl", "rec", "elbo")
#: maps a localization returns: the pixel maps plus the reconstruction in scan units
OUTPUT_MAPS = (*PIXEL_MAPS, "reconstruction")
#: maps a localization returns unless asked for others (SmoothGrad costs two extra passes)
DEFAULT_MAPS = tuple(m for m in OUTPUT_MAPS if m not in SMOOTHGRAD_MAPS)
