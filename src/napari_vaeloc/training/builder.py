"""One complete training run: healthy NIfTI sources -> a calibrated, checksummed model folder."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..combine import DEFAULT_WEIGHTS, GROW_FPR, OUTLINE_FRACTION, CombineSettings
from ..errors import InputError, ModelError, OutputExistsError
from ..models.card import (
    Architecture,
    Calibration,
    ModelCard,
    PostProcessingDefaults,
    Preprocessing,
    Provenance,
)
from ..models.store import LoadedModel, load_model, save_model, sha256_file
from ..preprocess import Normalisation, foreground_mask
from ..samples import TEMPLATES, TRAINING_TEMPLATES
from .datasets import (
    build_slice_dataset,
    find_nifti,
    heldout_masks,
    load_template_brain,
    load_training_volumes,
    nonzero_brain_mask,
)
from .individuals import TISSUE_PROFILES, IndividualConfig, individuals_for
from .loop import TrainConfig, calibrate, fit, fpr_table

#: the default threshold: a healthy foreground voxel exceeds it with this probability
DEFAULT_FPR = 0.01


#: the template whose grid and space training templates are brought onto
REFERENCE = "icbm-t1"
#: the licence entry of a user's own files when the user states none
OWN_DATA_LICENCE = "the user's own data: as the training data's terms"


def checkpoint_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.checkpoint"


@dataclasses.dataclass
class TrainingSet:
    """The volumes a run trains and validates on, in a fixed order: each source's own volume
    (when its modality is the model's) followed by its synthetic individuals.

    Attributes:
        volumes: the :class:`Volume` s.
        names: one per volume ("icbm-t1", "icbm-t1#3" for its individual 3, a file name).
        groups: the source (name) each volume comes from.
        individual: True for a synthetic individual.
        records: one dict per source for the model card: name, modality, description,
            origin, licence, individuals.
        brain_masks: bool (X, Y, Z) brain mask of each volume.
    """

    volumes: list
    names: list[str]
    groups: list[str]
    individual: list[bool]
    records: list[dict]
    brain_masks: list = dataclasses.field(default_factory=list)


def on_reference_grid(
    name: str, volume, mask: np.ndarray, cache_dir: str | os.PathLike | None = None
) -> tuple[object, np.ndarray]:
    """A template brain moved into the space and onto the grid of :data:`REFERENCE` (the ICBM
    2009c 1 mm grid whose 2 mm version the bundled models register scans to): unchanged when
    it is already on that grid, otherwise affinely registered to it as preparation registers
    a scan (:func:`napari_vaeloc.prepare.register`, to the reference at 2 mm) and resampled
    (linear; the mask nearest; 0 outside the brain). Cached in ``cache_dir`` when given."""
    from ..io import Volume
    from ..prepare import Template, register, resample
    from .datasets import block_mean
    from .individuals import Individual, load_individual, save_individual

    ref, ref_mask = load_template_brain(REFERENCE)
    if volume.shape == ref.shape and np.allclose(volume.affine, ref.affine, atol=1e-4):
        return volume, mask
    path = Path(cache_dir) / f"registered-{name}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        got = load_individual(path)
        return got.volume, got.brain_mask
    small, small_affine = block_mean(ref.data, ref.affine, ref.spacing, 2.0)
    small_mask = block_mean(ref_mask.astype(np.float32), ref.affine, ref.spacing, 2.0)[0] > 0.5
    target = Template(Volume(small, small_affine), small_mask, TEMPLATES[REFERENCE].modality, "")
    transform, _ = register(volume, target)
    new_mask = resample(mask, volume, ref, transform, "mask")
    data = np.where(new_mask, resample(volume.data, volume, ref, transform, "map"), 0)
    out = Volume(data.astype(np.float32), ref.affine.copy())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_individual(Individual(out, new_mask, {"registered": name, "to": REFERENCE}), path)
    return out, new_mask


def _source_brains(
    sources: list[str],
    modality: str,
    data_licence: str | None,
    cache_dir: str | os.PathLike | None = None,
) -> list[tuple[str, object, np.ndarray, str, dict]]:
    """(name, volume, brain mask, modality, card record) of every source volume. Template
    names must be training sources (moved onto the reference grid,
    :func:`on_reference_grid`); files are the user's (modality: the model's), used as given."""
    out = []
    for s in sources:
        if s in TEMPLATES:
            t = TEMPLATES[s]
            if not t.training:
                raise InputError(
                    f"{s} is held-out test anatomy and is never used for training; training "
                    f"templates: {', '.join(TRAINING_TEMPLATES)}"
                )
            vol, mask = on_reference_grid(s, *load_template_brain(s), cache_dir)
            record = {
                "name": s,
                "modality": t.modality,
                "description": t.description,
                "origin": t.origin,
                "licence": t.licence,
            }
            out.append((s, vol, mask, t.modality, record))
            continue
        for path, vol in zip(*_files(s), strict=True):
            stripped = float(np.mean(vol.data == 0)) > 0.05  # a flat zero background
            mask = nonzero_brain_mask(vol.data) if stripped else foreground_mask(vol.data, "otsu")
            record = {
                "name": path.name,
                "modality": modality,
                "description": "NIfTI file",
                "origin": "user's file",
                "licence": data_licence or OWN_DATA_LICENCE,
            }
            out.append((path.name, vol, mask, modality, record))
    return out


def _files(source: str):
    paths = find_nifti([source])
    return paths, load_training_volumes(paths)[0]


def build_training_set(
    sources: list[str],
    modality: str,
    individuals: int = 0,
    seed: int = 0,
    individual_config: IndividualConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    data_licence: str | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainingSet:
    """Load the ``sources`` (template names, NIfTI files, folders) and make ``individuals``
    synthetic individuals of each (:func:`individuals.individuals_for`, cached in
    ``cache_dir``), in the model's ``modality``: a source of another modality (T1, T2, PD)
    gives only its individuals, converted to the model's contrast.

    Raises:
        InputError: a held-out test template, an unknown source, or a source of another
            modality with no individuals or no known contrast.
    """
    base = individual_config or IndividualConfig()
    out = TrainingSet([], [], [], [], [])
    brains = _source_brains(sources, modality, data_licence, cache_dir)
    for name, vol, mask, src_mod, record in brains:
        same = src_mod.upper() == modality.upper()
        if not same and (not individuals or modality.upper() not in TISSUE_PROFILES):
            raise InputError(
                f"{name} is a {src_mod} source and the model is {modality}: use it through "
                "synthetic individuals (--individuals N) of a T1, T2 or PD model"
            )
        if same:
            out.volumes.append(vol)
            out.names.append(name)
            out.groups.append(name)
            out.individual.append(False)
            out.brain_masks.append(np.asarray(mask, bool))
        if individuals:
            contrast = None if same else modality.upper()
            cfg = dataclasses.replace(base, contrast=contrast)
            if log:
                log(f"synthetic individuals of {name}: {individuals}")
            made = individuals_for(name, vol, mask, src_mod, individuals, seed, cfg, cache_dir)
            for i, ind in enumerate(made):
                out.volumes.append(ind.volume)
                out.names.append(f"{name}#{i}")
                out.groups.append(name)
                out.individual.append(True)
                out.brain_masks.append(np.asarray(ind.brain_mask, bool))
        out.records.append({**record, "individuals": int(individuals)})
    return out


def choose_holdout(
    tset: TrainingSet,
    val_sources: list[str] | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> tuple[list[bool] | None, str]:
    """Which volumes validate: the named ``val_sources`` (whole sources with their
    individuals); else with three or more sources, ``val_fraction`` of them (at least one,
    seeded); else with individuals, ``val_fraction`` of all individuals (at least one), spread
    over the sources; else None (the dataset's own volume / slab split). Returns (flags, "source" |
    "individual" | "").

    Raises:
        InputError: a named validation source is not among the sources, or all are named.
    """
    groups = list(dict.fromkeys(tset.groups))
    if val_sources:
        unknown = sorted(set(val_sources) - set(groups))
        if unknown:
            raise InputError(f"validation source(s) {', '.join(unknown)} not among the sources")
        if set(val_sources) >= set(groups):
            raise InputError("every source is held out for validation: none is left to train on")
        return [g in val_sources for g in tset.groups], "source"
    rng = np.random.default_rng(seed)
    if len(groups) >= 3:
        k = max(1, round(len(groups) * val_fraction))
        held = {groups[i] for i in rng.choice(len(groups), size=k, replace=False)}
        return [g in held for g in tset.groups], "source"
    if any(tset.individual):
        # val_fraction of all individuals (at least one), dealt round-robin over the sources
        # in a seeded order, so that a small run does not lose one individual per source
        per_source = []
        for g in groups:
            ids = [
                i
                for i, (gg, ind) in enumerate(zip(tset.groups, tset.individual, strict=True))
                if gg == g and ind
            ]
            per_source.append([int(i) for i in rng.permutation(ids)])
        k = max(1, round(sum(map(len, per_source)) * val_fraction))
        flags = [False] * len(tset.volumes)
        order = [int(j) for j in rng.permutation(len(per_source))]
        rank = 0
        while k:
            for j in order:
                if k and rank < len(per_source[j]):
                    flags[per_source[j][rank]] = True
                    k -= 1
            rank += 1
        return flags, "individual"
    return None, ""


def reference_template_files(modality: str, sources: list[str]) -> dict[str, Path]:
    """The registration template a model trained on ``sources`` ships, as files to copy into
    its folder (name there -> file): when every source is a template name, the training
    volumes were all brought into the space of :data:`REFERENCE` (the ICBM 2009c grid), which
    is the space of the bundled model of ``modality``; its template, brain mask and the MNI
    notice are copied, so that scans are prepared (registered to that space) before they are
    scored. Empty for the user's own files (their space is theirs; see docs/prepare.md) or a
    modality without a bundled model."""
    from ..models.store import (
        MNI_NOTICE_FILE,
        TEMPLATE_FILE,
        TEMPLATE_MASK_FILE,
        bundled_models,
        read_card,
    )

    if not sources or not all(s in TEMPLATES for s in sources):
        return {}
    for folder in bundled_models().values():
        card = read_card(folder)
        pre = card.preprocessing
        if pre.modality != modality or not pre.template or not pre.template_brain_mask:
            continue
        files = {TEMPLATE_FILE: folder / pre.template}
        files[TEMPLATE_MASK_FILE] = folder / pre.template_brain_mask
        notice = folder / MNI_NOTICE_FILE
        if notice.is_file():
            files[notice.name] = notice
        if all(f.is_file() for f in files.values()):
            return files
    return {}


#: a source record's role when the run held it out whole
VALIDATION_ROLE = "validation and calibration only"


def mark_validation(records: list[dict], names: set[str]) -> None:
    """Mark the card records of the sources held out whole (``names``): their images set the
    stopping step and the calibration, never the weights' gradients."""
    for r in records:
        if r["name"] in names:
            r["role"] = VALIDATION_ROLE


def card_provenance(records: list[dict]) -> tuple[str, str]:
    """(sources, licence) lines of a model card naming every training source with its
    origin, synthetic individuals, licence and, for a held-out source, its role."""
    parts = []
    for r in records:
        text = f"{r['name']}: {r['description']}"
        if r.get("origin"):
            text += f" [{r['origin']}]"
        if r.get("individuals"):
            k = r["individuals"]
            text += f" + {k} synthetic individual{'' if k == 1 else 's'}"
        if r.get("role"):
            text += f" ({r['role']})"
        parts.append(text)
    licences = list(dict.fromkeys(r["licence"] for r in records))
    if len(licences) == 1:
        licence = licences[0]
    else:
        licence = "; ".join(f"{r['name']}: {r['licence']}" for r in records)
    return "; ".join(parts), licence


def check_provenance(card: ModelCard) -> None:
    """Refuse a model card without training provenance: it must name its training sources
    (``provenance`` and the training record's ``sources``) and their licence, and every
    per-source record (``source_records``) must name a source and its licence.

    Raises:
        ModelError: naming what is missing.
    """
    p = card.provenance
    missing = []
    if not p.sources.strip():
        missing.append("the training sources")
    if not p.licence.strip():
        missing.append("their licence")
    if not p.training.get("sources"):
        missing.append("the training record's sources")
    for r in p.training.get("source_records", []):
        if not str(r.get("name", "")).strip() or not str(r.get("licence", "")).strip():
            missing.append(f"the name and licence of source {r.get('name', '?')!r}")
    if missing:
        raise ModelError(
            f"model card {card.name!r} lacks training provenance: " + ", ".join(missing)
        )


def initial_weights(net, source: str | os.PathLike) -> dict:
    """Load the weights of the trained model ``source`` (bundled name or folder) into ``net``
    in place, for fine-tuning. Every tensor must have the shape ``net`` expects, except that a
    one-slice model can start a model with neighbouring slices as extra input channels: its
    first layer's weights go to the middle channel and the others start at zero, so the new
    model begins as exactly the old one. Returns the record the new card keeps (the model's
    name, weights checksum and training sources).

    Raises:
        ModelError: ``source`` cannot be loaded, or its architecture differs from ``net``'s.
    """
    loaded = load_model(source)
    state = dict(loaded.network.state_dict())
    own = net.state_dict()
    first = "encoder.0.weight"
    old_w, new_w = state.get(first), own.get(first)
    if (
        old_w is not None
        and new_w is not None
        and old_w.shape[1] == 1 < new_w.shape[1]
        and (old_w.shape[0], *old_w.shape[2:]) == (new_w.shape[0], *new_w.shape[2:])
    ):
        widened = new_w.new_zeros(new_w.shape)
        widened[:, new_w.shape[1] // 2] = old_w[:, 0]
        state[first] = widened
    wrong = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong or set(state) - set(own):
        raise ModelError(
            f"cannot start from model {loaded.card.name!r}: its architecture differs from the one "
            f"being trained ({loaded.card.architecture.config()} vs {net.config()})"
        )
    net.load_state_dict(state)
    return {
        "model": loaded.card.name,
        "weights_sha256": loaded.card.weights_sha256,
        "sources": loaded.card.provenance.sources if loaded.card.provenance else None,
    }


def prepare_slices(
    sources: list[str],
    cfg: TrainConfig,
    *,
    modality: str = "T2",
    normalisation: Normalisation | None = None,
    individuals: int = 0,
    individual_config: IndividualConfig | None = None,
    val_sources: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    data_licence: str | None = None,
    log: Callable[[str], None] | None = None,
):
    """The slices a run on ``sources`` trains and validates on (:class:`slicefile.SliceSet`):
    the sources and ``individuals`` synthetic individuals of each (cached in ``cache_dir``),
    split by :func:`choose_holdout`, sliced with the engine's preprocessing at ``cfg``'s axis,
    input size and neighbours.

    Raises:
        InputError: bad sources (see :func:`build_training_set`, :func:`choose_holdout`).
    """
    from .slicefile import SliceSet

    sources = [str(s) for s in sources]
    norm = normalisation or Normalisation()
    ind_cfg = individual_config or IndividualConfig()
    tset = build_training_set(
        sources, modality, individuals, cfg.seed, ind_cfg, cache_dir, data_licence, log
    )
    holdout, held_by = choose_holdout(tset, val_sources, seed=cfg.seed)
    if held_by == "source":
        held = {g for g, h in zip(tset.groups, holdout or [], strict=True) if h}
        mark_validation(tset.records, held)
    data = build_slice_dataset(
        tset.volumes,
        cfg.axis,
        cfg.image_size,
        norm,
        seed=cfg.seed,
        holdout=holdout,
        neighbours=cfg.neighbours,
    )
    if held_by:
        data.split["by"] = held_by
        data.split["val_names"] = [n for n, h in zip(tset.names, holdout or [], strict=True) if h]
    return SliceSet(
        data=data,
        axis=cfg.axis,
        image_size=cfg.image_size,
        neighbours=cfg.neighbours,
        modality=modality,
        normalisation=norm,
        records=tset.records,
        sources=[str(s) if s in TEMPLATES else Path(s).name for s in sources],
        individuals=(
            {"per_source": individuals, "config": ind_cfg.to_dict()} if individuals else None
        ),
    )


def train_model(
    sources: list[str],
    out: str | os.PathLike,
    cfg: TrainConfig,
    *,
    name: str | None = None,
    modality: str = "T2",
    normalisation: Normalisation | None = None,
    augment: dict | None = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    weights: dict[str, float] | None = None,
    progress: Callable[[dict], None] | None = None,
    individuals: int = 0,
    individual_config: IndividualConfig | None = None,
    val_sources: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    data_licence: str | None = None,
    log: Callable[[str], None] | None = None,
    init_from: str | os.PathLike | None = None,
    slices: str | os.PathLike | None = None,
) -> tuple[Path, dict]:
    """Train a conv VAE on the healthy ``sources`` (files, folders or template names) and
    ``individuals`` synthetic individuals of each, calibrate it on the held-out volumes or
    slices and write the model folder ``out``.

    ``augment``: :class:`augment.AugmentConfig` fields (None: the defaults; ``{}`` would also be
    the defaults; pass ``{"enabled": False}`` for none). Validation: :func:`choose_holdout`.
    Checkpoints go to a hidden folder beside ``out`` (the individuals are cached in its
    ``individuals`` folder unless ``cache_dir`` is given); it is removed once the model is
    written, except after a stop by ``cfg.max_minutes``, so that ``resume`` continues the run.
    ``data_licence`` states the terms of the user's own files for the card. ``init_from``: a
    trained model (bundled name or folder) whose weights the run starts from (fine-tuning; see
    :func:`initial_weights`). ``slices``: a slice set written by :func:`export_slices`, used
    instead of ``sources`` (which must then be empty); its axis, input size, neighbours,
    modality and normalisation must be ``cfg``'s and the given ones. Returns (model folder,
    training summary).

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        InputError: bad sources (see :func:`build_training_set`, :func:`choose_holdout`), or
            a slice set that cannot be read or does not match (:mod:`slicefile`).
        ModelError: the card would lack training provenance (:func:`check_provenance`), or
            ``init_from`` cannot be loaded or does not fit the architecture.
    """
    import torch

    from ..models.vae import ConvVAE
    from .augment import AugmentConfig, Augmenter
    from .slicefile import check_matches, read_meta, read_slices

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    norm = normalisation or Normalisation()
    ckpt = checkpoint_dir_for(out)
    if slices is not None:
        if sources:
            raise InputError("give either sources or a slice set (--slices), not both")
        check_matches(
            read_meta(slices), slices, cfg.axis, cfg.image_size, cfg.neighbours, modality, norm
        )
        sset = read_slices(slices)
    else:
        sset = prepare_slices(
            sources,
            cfg,
            modality=modality,
            normalisation=norm,
            individuals=individuals,
            individual_config=individual_config,
            val_sources=val_sources,
            cache_dir=cache_dir if cache_dir is not None else ckpt / "individuals",
            data_licence=data_licence,
            log=log,
        )
    data = sset.data
    aug_d = dict(augment or {})
    enabled = aug_d.pop("enabled", True)
    aug_cfg = AugmentConfig.from_dict(aug_d) if enabled else AugmentConfig.none()
    aug_cfg = dataclasses.replace(aug_cfg, background=data.pad_value, clip=tuple(norm.clip))
    torch.manual_seed(cfg.seed)
    net = ConvVAE(
        image_size=cfg.image_size,
        z_dim=cfg.z_dim,
        widths=tuple(cfg.widths) if cfg.widths else None,
        in_channels=2 * cfg.neighbours + 1,
        out_channels=1,
    )
    init_record = initial_weights(net, init_from) if init_from is not None else None
    result = fit(
        net,
        data.train,
        data.val,
        cfg,
        augment=Augmenter(aug_cfg),
        checkpoint_dir=ckpt,
        resume=resume,
        device=device,
        progress=progress,
    )
    net = result.network.cpu()
    weights = dict(weights or DEFAULT_WEIGHTS)
    calibration = (
        calibrate(net, data.val, data.val_foreground, cfg.likelihood_log_std, weights=weights)
        if len(data.val)
        else None
    )
    table = (calibration.combined_fpr if calibration is not None else None) or {}
    threshold = table.get(str(DEFAULT_FPR), 1.0)
    sources_line, licence = card_provenance(sset.records)
    training_record = {
        "config": cfg.to_dict(),
        "augment": aug_cfg.to_dict(),
        "split": data.split,
        "history": result.history,
        "best_step": result.best_step,
        "best_val_loss": result.best_val,
        "stopped": result.stopped,
        "sources": sset.sources,
        "source_records": sset.records,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "package_version": __version__,
    }
    if init_record is not None:
        training_record["init_from"] = init_record
    if sset.individuals:
        training_record["individuals"] = sset.individuals
    if slices is not None:
        training_record["slice_set"] = Path(slices).name
    card = ModelCard(
        name=name or out.name,
        architecture=Architecture.from_dict(net.config(), "network config"),
        preprocessing=Preprocessing(
            axis=cfg.axis, normalisation=norm, modality=modality, neighbours=cfg.neighbours
        ),
        likelihood_log_std=cfg.likelihood_log_std,
        calibration=calibration,
        defaults=PostProcessingDefaults(
            weights=weights,
            threshold=threshold,
            threshold_fpr=DEFAULT_FPR,
            smoothing_mm=0.0,
            min_size_mm3=0.0,
        ),
        provenance=Provenance(
            description=f"conv VAE (Zimmerer et al. 2019) trained on healthy {modality} "
            f"{cfg.axis} slices",
            sources=sources_line,
            licence=licence,
            training=training_record,
        ),
    )
    check_provenance(card)
    shipped = reference_template_files(modality, sset.sources)
    if shipped:  # the model learned the reference space: scans are registered to it
        from ..models.store import TEMPLATE_FILE, TEMPLATE_MASK_FILE

        card.preprocessing.template = TEMPLATE_FILE
        card.preprocessing.template_brain_mask = TEMPLATE_MASK_FILE
    folder = save_model(net, card, out, overwrite=overwrite, extra_files=shipped)
    if ckpt.is_dir() and result.stopped != "max_minutes":
        import shutil

        shutil.rmtree(ckpt)
    summary = {
        "steps": result.history[-1]["step"] if result.history else 0,
        "best_val_loss": result.best_val,
        "stopped": result.stopped,
        "n_train": data.split["n_train"],
        "n_val": data.split["n_val"],
        "threshold": threshold,
        "seconds": result.history[-1]["seconds"] if result.history else float("nan"),
        "final_train_loss": result.history[-1]["train_loss"] if result.history else float("nan"),
    }
    return folder, summary


def export_slices(
    sources: list[str],
    path: str | os.PathLike,
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    **prepare: object,
) -> dict:
    """Write the slices a run on ``sources`` would train on (:func:`prepare_slices`, which
    takes the keyword arguments ``prepare``) to the slice set ``path``
    (:func:`slicefile.write_slices`), for ``train_model(slices=path)`` on another machine.
    Returns a summary (slices, input size, sources).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        InputError: bad sources (see :func:`prepare_slices`).
        OutputError: ``path`` cannot be written.
    """
    from ..io import check_output_folder
    from .slicefile import write_slices

    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(p)
    check_output_folder(p.resolve().parent)
    sset = prepare_slices(sources, cfg, **prepare)  # type: ignore[arg-type]
    write_slices(sset, p, overwrite=overwrite)
    return {
        "train_slices": int(sset.data.split["n_train"]),
        "val_slices": int(sset.data.split["n_val"]),
        "image_size": sset.image_size,
        "sources": ", ".join(sset.sources),
        "megabytes": round(p.stat().st_size / 1e6, 1),
    }


#: ``recalibrate(outline_smoothing_mm=KEEP)``: the card's outline smoothing stays
KEEP = "card"
#: ``recalibrate(outline_smoothing_mm=BEST)``: the outline is chosen on seeded lesions
BEST = "best"


def heldout_ventricles(
    recorded: float | None, config: IndividualConfig | None, asked: float | None
) -> float | None:
    """How far (mm, the largest draw) a recalibration grows the held-out individuals'
    ventricles beyond what the training record made: ``asked`` (None: ``recorded``, the card's
    calibration's :attr:`~napari_vaeloc.models.card.Calibration.heldout_ventricles_mm`);
    None when that is 0 or what the record's ``config`` already draws.

    Raises:
        InputError: ``asked`` is negative, or ventricles are to grow in a model trained
            without synthetic individuals (``config`` None).
    """
    if asked is not None and not (math.isfinite(asked) and asked >= 0):
        raise InputError(f"--ventricles must be a distance of 0 mm or more, not {asked:g}")
    grow = recorded if asked is None else asked
    if not grow:
        return None
    if config is None:
        raise InputError(
            "--ventricles grows the ventricles of the held-out synthetic individuals, and this "
            "model was trained without any (vaeloc train --individuals)"
        )
    return None if config.ventricles_mm == (0.0, float(grow)) else float(grow)


def recalibrate(
    folder: str | os.PathLike,
    weights: dict[str, float],
    fpr: float | None = DEFAULT_FPR,
    smoothing_mm: float | None = None,
    min_size_mm3: float | None = None,
    scan_normalise: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
    grow_fpr: float | None = GROW_FPR,
    outline_fraction: float | None = None,
    outline_smoothing_mm: float | str | None = KEEP,
    beyond_template: bool | None = None,
    smoothing_candidates: Sequence[float] | None = None,
    healthy_scans: Sequence[str | os.PathLike] = (),
    ventricles_mm: float | None = None,
    log: Callable[[str], None] | None = None,
) -> Calibration:
    """Recompute a trained model's calibration for new default settings on the same held-out
    slices it was validated on (rebuilt from the recorded sources, individuals and split), set the
    default threshold to the healthy false-positive rate ``fpr``, and rewrite ``model.json``
    through the card's atomic save.

    With ``grow_fpr`` (a level of the table looser than the threshold's; None: none) the
    default mask outlines each part down to that level's threshold, at ``outline_fraction`` (None:
    the card's, else :data:`~napari_vaeloc.combine.OUTLINE_FRACTION`)
    of the part's peak (:mod:`napari_vaeloc.combine`, step 5), on the combination smoothed
    ``outline_smoothing_mm`` when given (None: on the combined map itself; :data:`KEEP`: as the
    card says, so that recalibrating, e.g. on a site's healthy scans, keeps the card's outline
    unless told otherwise; :data:`BEST`: the map and the fraction are chosen on lesions seeded
    into the prepared held-out individuals,
    :func:`~napari_vaeloc.training.operating_point.choose_outline`, every candidate's score
    recorded). The fraction of the
    held-out healthy brain voxels the default mask then marks, each brain's mask with its levels
    read from the other brains alone (leave one out), is recorded as ``mask_fpr``, the rate the
    fronts claim; with the levels set on all of them as ``mask_fpr_calibration``.

    Component scales always come from the held-out slices in model space. The false-positive
    table of the combined map comes, for a model that ships a template, from the held-out
    individuals turned into scans and put through the preparation stage as a user's scan is
    (:mod:`napari_vaeloc.training.operating_point`); otherwise, with 3D smoothing
    (``smoothing_mm`` > 0) or per-scan normalisation (``scan_normalise``; None keeps the card's
    settings), from the held-out volumes / slabs localized in volume space, since both depend
    on more than one slice. ``fpr=None`` chooses the level on lesions seeded into those same
    held-out brains (:func:`~napari_vaeloc.training.operating_point.choose_operating_point`)
    and records the Dice of each level in the calibration. Synthetic individuals are remade
    from the recorded seeds (read from ``cache_dir`` when they were cached there); the card
    names a user's training files without their folder, ``source_dir`` (default: the working
    folder). ``smoothing_candidates`` (sigmas, mm; instead of ``smoothing_mm``) chooses the
    default smoothing on lesions seeded into the prepared held-out individuals, each
    candidate at its own threshold
    (:func:`~napari_vaeloc.training.operating_point.choose_smoothing`), and records every
    candidate's score. ``beyond_template`` (None: as the card's calibration was made,
    ``Calibration.combined_beyond_template``) scores the prepared held-out individuals also where
    their brain lies beyond the template's (``PrepareSettings.beyond_template``), as no front
    does: the edge then stands in for how much less regular real scans are than synthetic
    individuals (see docs/models.md). ``healthy_scans`` (NIfTI files of healthy heads or
    brains, e.g. a site's own normal scans) join the held-out individuals everywhere above,
    each prepared as a user's scan is
    (:func:`~napari_vaeloc.training.operating_point.healthy_scan_files`); the calibration
    records their file names and checksums. ``ventricles_mm`` (mm; None: as the card's
    calibration was made, else as the training record says) remakes the synthetic individuals
    with their ventricles grown into the tissue around them by a distance drawn from 0 to it
    (:func:`~napari_vaeloc.training.individuals.grow_ventricles`, the draw of
    ``vaeloc train --ventricles``; 0: as the training record says), so that a model trained
    without older brains' ventricles is calibrated on held-out brains that have them; recorded
    as ``Calibration.heldout_ventricles_mm``. The same brains also give the tables of the
    combination at every other smoothing of
    :data:`~napari_vaeloc.training.operating_point.LEVEL_SMOOTHINGS_MM`
    (``Calibration.smoothing_fpr``; none for a calibration in volume space), so that a user's
    smoothing keeps calibrated levels. ``log`` gets a line as each long step starts. The
    weights file, and so its checksum, is unchanged. Returns the new calibration.

    Raises:
        ModelError: the card lacks training provenance (:func:`check_provenance`); nothing
            is rewritten.
        InputError: a weight names an unknown map, a training file is not found,
            ``ventricles_mm`` is negative or not finite, or given for a model trained without
            synthetic individuals, the smoothing is to be chosen together with the level
            (``fpr`` None) or for a model without a template, or a healthy scan is unreadable,
            does not fit the model, or is given for a model without a template.
    """
    from ..models.store import CARD_FILE, load_model

    CombineSettings(weights=weights)  # unknown map names: refused before any work
    if smoothing_candidates is not None and fpr is None:
        raise InputError("choose the smoothing or the threshold's level, not both at once")
    folder = Path(folder)
    model = load_model(folder)
    card = model.card
    check_provenance(card)
    if smoothing_candidates is not None and not card.preprocessing.template:
        raise InputError(
            f"model {card.name!r} ships no template: the smoothing is chosen on held-out "
            "individuals prepared as scans, which needs one"
        )
    choose = outline_smoothing_mm == BEST
    if choose and (smoothing_candidates is not None or fpr is None or grow_fpr is None):
        raise InputError(
            "the outline is chosen alone: not with the smoothing or the threshold's level, and "
            "not without a grow level to outline to"
        )
    if choose and not card.preprocessing.template:
        raise InputError(
            f"model {card.name!r} ships no template: the outline is chosen on held-out "
            "individuals prepared as scans, which needs one"
        )
    from ..prepare import PrepareSettings, model_template
    from .operating_point import healthy_scan_files

    template = model_template(folder, card)
    if healthy_scans and template is None:
        raise InputError(
            f"model {card.name!r} ships no template: healthy scans are prepared as a user's "
            "scan is, which needs one"
        )
    say = log or (lambda line: None)
    if beyond_template is None:
        beyond_template = bool(card.calibration.combined_beyond_template)
    prep = PrepareSettings(beyond_template=beyond_template)
    if healthy_scans:
        say(f"preparing {len(healthy_scans)} healthy scan(s) ...")
    extra = healthy_scan_files(healthy_scans, template, prep) if healthy_scans else []
    d = card.defaults
    smoothing = float((d.smoothing_mm or 0.0) if smoothing_mm is None else smoothing_mm)
    if outline_fraction is None:
        outline_fraction = OUTLINE_FRACTION if d.outline_fraction is None else d.outline_fraction
    sharp: float | None = d.outline_smoothing_mm  # KEEP, and BEST until it has chosen
    if outline_smoothing_mm not in (KEEP, BEST):
        sharp = None if outline_smoothing_mm is None else float(outline_smoothing_mm)
    if scan_normalise is None:
        scan_normalise = bool(d.scan_normalise)
    min_size = float((d.min_size_mm3 or 0.0) if min_size_mm3 is None else min_size_mm3)
    record = card.provenance.training
    sources = [
        s if s in TEMPLATES or source_dir is None else str(Path(source_dir) / s)
        for s in record["sources"]
    ]
    split = record.get("split", {})
    made = record.get("individuals", {})
    made_config = IndividualConfig.from_dict(made["config"]) if made else None
    grown = heldout_ventricles(card.calibration.heldout_ventricles_mm, made_config, ventricles_mm)
    if grown is not None:
        made_config = dataclasses.replace(made_config, ventricles_mm=(0.0, grown))
    brains = None
    say("making the held-out brains from the training record ...")
    if made or "val_volumes" in split:
        tset = build_training_set(
            sources,
            card.modality,
            made.get("per_source", 0),
            record.get("config", {}).get("seed", 0),
            made_config,
            cache_dir=cache_dir,
        )
        volumes, brains = tset.volumes, tset.brain_masks
    else:
        volumes, _ = load_training_volumes(sources)
    norm = card.normalisation
    val_volumes = split.get("val_volumes")
    data = build_slice_dataset(
        volumes,
        card.axis,
        card.image_size,
        norm,
        val_fraction=split.get("val_fraction", 0.15),
        slab=split.get("slab", 8),
        gap=split.get("gap", 2),
        seed=split.get("seed", 0),
        holdout=None if val_volumes is None else [i in val_volumes for i in range(len(volumes))],
        neighbours=card.preprocessing.neighbours,
    )
    calibration = calibrate(
        model.network, data.val, data.val_foreground, card.likelihood_log_std, weights=weights
    )
    calibration.heldout_ventricles_mm = grown
    calibration.combined_beyond_template = True if beyond_template and template else None
    settings = CombineSettings(
        weights=weights,
        smoothing_mm=smoothing,
        scan_normalise=scan_normalise,
        min_size_mm3=min_size,
    )
    from .operating_point import (
        LEVEL_SMOOTHINGS_MM,
        choose_operating_point,
        choose_outline,
        choose_smoothing,
        healthy_fpr_table,
        healthy_fpr_tables,
        heldout_scans,
        mask_rates,
        outlined,
    )

    masks = heldout_masks(volumes, card.axis, card.image_size, norm, split)
    say("scoring the held-out healthy brains ...")
    scans = heldout_scans(volumes, masks, brains, template, prep) if template else []
    scans += extra
    if smoothing_candidates is not None and not scans:
        raise InputError(
            "no held-out individual passed the preparation: the smoothing cannot be chosen"
        )
    if smoothing_candidates is not None:
        choice = choose_smoothing(
            model, scans, settings, calibration, prep, fpr=fpr, grow_fpr=grow_fpr,
            outline_fraction=outline_fraction, candidates=smoothing_candidates,
            outline_smoothing_mm=sharp,
        )  # fmt: skip
        smoothing = choice.smoothing_mm
        settings = settings.replace(smoothing_mm=smoothing)
        calibration.combined_smoothing_scores = choice.scores
        calibration.combined_fpr = choice.table
    elif scans:  # held-out individuals turned into scans and prepared as a user's scan is
        calibration.combined_fpr = healthy_fpr_table(model, scans, settings, calibration, prep)
    level_scans = list(scans)  # the brains every table is read from (prepared as users' are)
    if scans:
        calibration.combined_source = (
            "held-out healthy individuals"
            + (f" (ventricles grown by up to {grown:g} mm)" if grown else "")
            + " after preparation"
            + (f" and {len(extra)} healthy scan{'s' * (len(extra) != 1)}" if extra else "")
            + (", scored beyond the template's brain too" if beyond_template else "")
        )
        if extra:
            calibration.combined_healthy_scans = {
                Path(p).name: sha256_file(Path(p)) for p in healthy_scans
            }
    elif smoothing > 0 or scan_normalise or fpr is None:
        calibration.combined_fpr = volume_fpr_table(model, volumes, masks, settings, calibration)
        calibration.combined_source = "held-out healthy voxels, volume space" + (
            f" (ventricles grown by up to {grown:g} mm)" if grown else ""
        )
    if calibration.combined_source is not None:
        calibration.combined_smoothing_mm = smoothing
        calibration.combined_scan_normalise = scan_normalise
    table = calibration.combined_fpr or {}
    grow = table.get(str(grow_fpr)) if grow_fpr is not None else None
    if grow is None:
        grow_fpr = None
    settings = outlined(settings, table, grow_fpr, outline_fraction, sharp)
    if not scans:
        scans = heldout_scans(volumes, masks, brains, None)
    if fpr is None:
        point = choose_operating_point(model, scans, settings, calibration, prep)
        fpr = point.fpr
        calibration.combined_dice = point.dice
        calibration.combined_dice_cases = point.cases
    if grow_fpr is not None and grow_fpr <= fpr:  # the chosen level is no stricter: no outline
        grow_fpr = grow = None
        settings = settings.without_outline()
    settings = settings.replace(threshold=table[str(fpr)])
    if choose and grow_fpr is not None:
        say("choosing the outline on lesions seeded into the held-out brains ...")
        pick = choose_outline(model, scans, settings, calibration, prep)
        sharp, outline_fraction = pick.outline_smoothing_mm, pick.outline_fraction
        settings = settings.replace(outline_smoothing_mm=sharp, outline_fraction=outline_fraction)
        calibration.combined_outline_scores = pick.scores
    final_grow, chosen = grow_fpr, fpr

    def levels_of(others: dict[str, float]) -> CombineSettings:
        """The default mask's settings with its levels read from another table."""
        return outlined(settings, others, final_grow, outline_fraction, sharp).replace(
            threshold=others[str(chosen)]
        )

    calibration.mask_fpr_calibration, calibration.mask_fpr = mask_rates(
        model, scans, settings, calibration, prep, levels_of
    )
    if calibration.mask_fpr is None:  # one held-out brain: nothing left out to measure on
        calibration.mask_fpr = calibration.mask_fpr_calibration
    others = [c for c in LEVEL_SMOOTHINGS_MM if not math.isclose(c, smoothing)]
    if level_scans and others:  # levels for the panel's other smoothings, from the same brains
        say("reading the levels of other smoothings from the held-out brains ...")
        tables = healthy_fpr_tables(model, level_scans, settings, calibration, prep, others)
        calibration.smoothing_fpr = {f"{c:g}": t for c, t in tables.items()}
    else:
        calibration.smoothing_fpr = None
    card.calibration = calibration
    card.defaults = dataclasses.replace(
        d,
        weights=dict(weights),
        smoothing_mm=smoothing,
        scan_normalise=scan_normalise,
        threshold=table[str(fpr)],
        threshold_fpr=fpr,
        grow_threshold=settings.grow_threshold,
        grow_fpr=grow_fpr,
        outline_fraction=settings.outline_fraction if grow is not None else None,
        outline_smoothing_mm=settings.outline_smoothing_mm if grow is not None else None,
        min_size_mm3=min_size,
    )
    card.save(folder / CARD_FILE, overwrite=True)
    return calibration


def volume_fpr_table(
    model: LoadedModel,
    volumes: list,
    masks: list,
    settings: CombineSettings,
    calibration: Calibration,
) -> dict[str, float]:
    """Healthy false-positive-rate table {fpr: threshold} of the combined map under
    ``settings`` (scaled by ``calibration``) over the object voxels inside ``masks`` (bool
    (X, Y, Z) per volume; None skips a volume), each volume localized and post-processed as
    every front does it."""
    from ..combine import PostProcessor
    from ..engine import localize

    values = []
    for vol, mask in zip(volumes, masks, strict=True):
        if mask is None:
            continue
        res = localize(vol, model, maps=tuple(settings.used_weights()), prepare=None)
        combined = PostProcessor(res, settings, calibration).combined()
        values.append(combined[mask & res.foreground])
    return fpr_table(np.concatenate(values) if values else np.zeros(0, np.float32))
