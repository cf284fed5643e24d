"""`vaeloc screen` on a real Dask cluster (2 worker processes), real NIfTI files and the bundled
t2-brain and t1-brain models: the ranked table, failures, resuming after a killed run, and the
same outputs as `vaeloc localize`."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from napari_vaeloc import cohort, cohort_report
from napari_vaeloc.cli import main
from napari_vaeloc.samples import sample_path

MAPS = ("rec_error", "kl_grad", "combi", "restoration", "reconstruction", "combined", "mask")


def _sphere(data: np.ndarray, centre: np.ndarray, radius: float, value: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in data.shape)]
    inside = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
    out = data.copy()
    out[inside] += np.float32(value)
    return out


def make_cohort(folder: Path, n_healthy: int, n_lesion: int, seed: int = 0) -> dict[str, str]:
    """Healthy T2 brains (the bundled 2 mm sample with noise or a gain) and brains with a bright
    sphere, in the t2-brain model's space; returns file name -> "healthy" or "lesion"."""
    img = nib.load(sample_path("t2-healthy"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    brain = data > np.percentile(data[data > 0], 20)
    centre = np.argwhere(brain).mean(axis=0)
    median = float(np.median(data[brain]))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    offsets = [(8, 5, 4), (-10, -8, 2), (-6, 10, -4), (4, -12, 6), (-4, 6, 8)]
    for i in range(n_healthy):
        noisy = data * np.float32(1 + 0.03 * i) + rng.normal(0, 0.01 * median, data.shape) * brain
        name = f"healthy{i}.nii.gz"
        nib.save(nib.Nifti1Image(noisy.astype(np.float32), img.affine), folder / name)
        kinds[name] = "healthy"
    for i in range(n_lesion):
        lesion = _sphere(data, centre + offsets[i % len(offsets)], 6, median)
        name = f"lesion{i}.nii.gz"
        nib.save(nib.Nifti1Image(lesion, img.affine), folder / name)
        kinds[name] = "lesion"
    return kinds


def screen_args(inputs, out, *extra) -> list[str]:
    return [
        "screen",
        *map(str, inputs),
        "--out",
        str(out),
        "--model",
        "t2-brain",
        "--prepare",
        "none",
        "--torch-threads",
        "1",
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit="4GB",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"},
            silence_logs=logging.ERROR,
        ) as c,
        Client(c, set_as_default=False) as client,
    ):
        yield c.scheduler_address, client


@pytest.fixture(scope="module")
def screened(tmp_path_factory, cluster):
    """A folder of 2 healthy and 2 lesioned scans, a truncated one, a 4D one and a text file,
    screened on the 2-worker cluster."""
    address, client = cluster
    root = tmp_path_factory.mktemp("cohort")
    scans = root / "scans"
    kinds = make_cohort(scans, 2, 2)
    whole = (scans / "lesion0.nii.gz").read_bytes()
    (scans / "sub").mkdir()
    (scans / "sub" / "corrupt.nii.gz").write_bytes(whole[: len(whole) // 2])
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), scans / "4d.nii")
    (scans / "notes.txt").write_text("not a scan")
    before = client.run(cohort.worker_models_loaded)
    out = root / "out"
    rc = main(screen_args([scans], out, "--scheduler", address))
    after = client.run(cohort.worker_models_loaded)
    return {"rc": rc, "out": out, "scans": scans, "kinds": kinds, "loads": (before, after)}


def _table(out: Path) -> pd.DataFrame:
    pq = pd.read_parquet(out / "summary.parquet")
    csv = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=[""])
    assert list(pq.columns) == list(cohort_report.COLUMNS) == list(csv.columns)
    assert pq["scan"].tolist() == csv["scan"].tolist()
    assert pq["status"].tolist() == csv["status"].tolist()
    for col in ("anomalous_ml", "worst_slice_score", "volume_score", "seconds"):
        np.testing.assert_allclose(pq[col].to_numpy(float), csv[col].to_numpy(float))
    return pq


def test_a_folder_is_screened_ranked_and_reported(screened):
    out, kinds = screened["out"], screened["kinds"]
    assert screened["rc"] == 1  # some scans failed; the run went on
    df = _table(out)
    by_name = {Path(s).name: r for s, r in zip(df["scan"], df.to_dict("records"), strict=True)}
    assert set(by_name) == {*kinds, "corrupt.nii.gz", "4d.nii", "notes.txt"}

    corrupt = by_name["corrupt.nii.gz"]
    assert corrupt["status"] == "failed" and "truncated or corrupted" in corrupt["error"]
    four_d = by_name["4d.nii"]
    assert four_d["status"] == "failed" and "4D" in four_d["error"]
    assert by_name["notes.txt"]["status"] == "skipped"
    assert "not a NIfTI" in by_name["notes.txt"]["error"]
    # nothing was written for them: no folder to point at
    for name in ("corrupt.nii.gz", "4d.nii", "notes.txt"):
        assert by_name[name]["output"] == "", name
    assert not (out / "scans" / "sub__corrupt").exists() and not (out / "scans" / "4d").exists()
    for name in kinds:
        assert by_name[name]["output"] == f"scans/{name[: -len('.nii.gz')]}"
        assert (out / by_name[name]["output"]).is_dir()

    done = df[df["status"] == "done"]
    assert len(done) == len(kinds) and done["rank"].tolist() == list(range(1, len(kinds) + 1))
    order = [kinds[Path(s).name] for s in done["scan"]]
    assert order == ["lesion", "lesion", "healthy", "healthy"]  # most anomalous first
    assert (done["anomalous_ml"].to_numpy()[:2] > 2).all()
    assert (done["anomalous_ml"].to_numpy()[2:] == 0).all()
    assert (done["components"].to_numpy()[:2] >= 1).all()
    assert (done["model"] == "t2-brain").all() and (done["fit"] == "not prepared").all()
    assert (done["seconds"] > 0).all() and not done["reused"].any()
    assert df["rank"].isna().sum() == 3  # failed and skipped rows are not ranked

    # every scan's outputs in its own folder, with its thumbnail and its done-record last
    for name in kinds:
        stem = name[: -len(".nii.gz")]
        folder = out / "scans" / stem
        record = json.loads((folder / cohort.RECORD).read_text())
        assert record["model"] == "t2-brain" and record["scan"] == str(screened["scans"] / name)
        for f in [*(f"{stem}_{m}.nii.gz" for m in MAPS), f"{stem}_scores.json"]:
            assert (folder / f).is_file(), f
            assert record["files"][f] == (folder / f).stat().st_size
        assert nib.load(folder / f"{stem}_mask.nii.gz").shape == (96, 114, 96)
    assert not (out / "scans" / "sub__corrupt" / cohort.RECORD).exists()

    # the report: the lesioned scans first, each with its thumbnail
    html = (out / "report.html").read_text()
    assert html.index("lesion") < html.index("healthy0.nii.gz")
    assert "truncated or corrupted" in html and "notes.txt" in html
    import matplotlib.image

    for stem in ("lesion0", "lesion1", "healthy0"):
        rel = f"scans/{stem}/{stem}_thumbnail.png"
        assert rel in html
        png = matplotlib.image.imread(out / rel)
        assert png.ndim == 3 and png.shape[0] > 100
    # the lesion shows in red on its thumbnail; a healthy scan's thumbnail has none
    red = lambda p: int((p[..., 0] - p[..., 1] > 0.4).sum())  # noqa: E731
    assert red(matplotlib.image.imread(out / "scans/lesion0/lesion0_thumbnail.png")) > 20
    assert red(matplotlib.image.imread(out / "scans/healthy0/healthy0_thumbnail.png")) == 0

    # each worker read the model once, however many scans it screened
    before, after = screened["loads"]
    assert all(after[w] - before[w] <= 1 for w in after)
    assert sum(after.values()) >= 1


def test_outputs_and_row_equal_vaeloc_localize(screened, tmp_path):
    import torch

    out = screened["out"]
    scan = screened["scans"] / "lesion1.nii.gz"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same arithmetic, bit for bit
    try:
        rc = main(
            [
                "localize",
                str(scan),
                "--model",
                "t2-brain",
                "--prepare",
                "none",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    folder = out / "scans" / "lesion1"
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(
        p.name for p in folder.iterdir() if p.name.endswith((".nii.gz", "_scores.json"))
    )
    for name in written:
        if name.endswith(".nii.gz"):
            a, b = nib.load(tmp_path / name), nib.load(folder / name)
            np.testing.assert_array_equal(a.affine, b.affine)
            assert a.get_data_dtype() == b.get_data_dtype()
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    mine = json.loads((folder / "lesion1_scores.json").read_text())
    theirs = json.loads((tmp_path / "lesion1_scores.json").read_text())
    for key in ("volume_scores", "slice_scores", "combination", "mask_voxels", "model"):
        assert mine[key] == theirs[key], key
    row = _table(out).set_index("scan").loc[str(scan)]
    assert row["volume_score"] == pytest.approx(theirs["volume_scores"]["elbo_mean"], rel=1e-6)
    assert row["worst_slice_score"] == pytest.approx(theirs["volume_scores"]["elbo_max"], rel=1e-6)
    assert row["anomalous_ml"] == pytest.approx(theirs["mask_volume_ml"], rel=1e-9)
    assert row["threshold"] == pytest.approx(theirs["combination"]["threshold"])


def test_prepared_scan_equals_vaeloc_localize(cluster, tmp_path):
    """Preparation included: the raw T1 head with skull, in its own orientation."""
    import torch

    address, _ = cluster
    scan = sample_path("t1-head-lesion")
    common = ["--model", "t1-brain", "--quiet"]
    rc = main(
        [
            "screen",
            str(scan),
            "--out",
            str(tmp_path / "s"),
            "--scheduler",
            address,
            "--torch-threads",
            "1",
            *common,
        ]
    )
    assert rc == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["localize", str(scan), "--out", str(tmp_path / "l"), *common]) == 0
    finally:
        torch.set_num_threads(threads)
    stem = "sample_t1_head_lesion"
    mine = json.loads((tmp_path / "s" / "scans" / stem / f"{stem}_scores.json").read_text())
    theirs = json.loads((tmp_path / "l" / f"{stem}_scores.json").read_text())
    assert mine["preparation"]["template"] == theirs["preparation"]["template"] != ""
    assert [c["level"] for c in mine["preparation"]["checks"]] == [
        c["level"] for c in theirs["preparation"]["checks"]
    ]
    # the preparation is repeatable (see test_prepare.py): the same transform, the same
    # slices scored, the same mask to the voxel
    assert mine["volume_scores"]["n_slices_scored"] == theirs["volume_scores"]["n_slices_scored"]
    for k, v in theirs["volume_scores"].items():
        assert mine["volume_scores"][k] == pytest.approx(v, rel=1e-6), k
    a = np.asarray(nib.load(tmp_path / "s" / "scans" / stem / f"{stem}_mask.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "l" / f"{stem}_mask.nii.gz").dataobj)
    assert a.shape == b.shape == nib.load(scan).shape and b.sum() > 100
    assert np.array_equal(a, b), int((a != b).sum())
    row = _table(tmp_path / "s").iloc[0]
    assert row["status"] == "done" and row["model"] == "t1-brain" and row["rank"] == 1
    checks = "; ".join(f"{c['name']}: {c['level']}" for c in theirs["preparation"]["checks"])
    assert row["fit_checks"] == checks and row["fit"] in ("ok", "warn")
    assert row["anomalous_ml"] == pytest.approx(mine["mask_volume_ml"])


def _outputs(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file() and "scans" in p.parts
    }


def test_a_killed_run_resumes_without_recomputing(cluster, tmp_path):
    address, _ = cluster
    kinds = make_cohort(tmp_path / "in", 3, 3, seed=1)
    out = tmp_path / "out"
    # a real run in its own process, with its own one-worker local cluster, killed (SIGKILL,
    # the whole process group: client, nanny and worker) once two scans are finished
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = screen_args([tmp_path / "in"], out, "--workers", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_vaeloc.cli", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob(f"scans/*/{cohort.RECORD}"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the screen did not get going"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
    finished = {p.parent.name for p in out.glob(f"scans/*/{cohort.RECORD}")}
    assert 2 <= len(finished) < len(kinds)  # killed half-way
    before = {k: v for k, v in _outputs(out).items() if Path(k).parts[1] in finished}

    assert main(screen_args([tmp_path / "in"], out, "--scheduler", address)) == 0
    df = _table(out)
    assert (df["status"] == "done").all() and len(df) == len(kinds)
    reused = {Path(s).name[: -len(".nii.gz")] for s in df.loc[df["reused"], "scan"]}
    assert reused == finished  # nothing finished was recomputed ...
    after = _outputs(out)
    assert {k: after[k] for k in before} == before  # ... not one file touched
    for name in kinds:  # ... and the rest is done
        stem = name[: -len(".nii.gz")]
        assert (out / "scans" / stem / cohort.RECORD).is_file()
        assert (out / "scans" / stem / f"{stem}_mask.nii.gz").is_file()
    assert not list(out.rglob(".vaeloc-*"))  # what the kill left mid-write was rolled back
    ranked = [kinds[Path(s).name] for s in df.sort_values("rank")["scan"]]
    assert ranked == ["lesion"] * 3 + ["healthy"] * 3


def test_other_settings_need_overwrite(cluster, tmp_path, capsys):
    address, _ = cluster
    make_cohort(tmp_path / "in", 0, 1)
    out = tmp_path / "out"
    base = screen_args([tmp_path / "in"], out, "--scheduler", address)
    assert main(base) == 0
    stamps = _outputs(out)
    capsys.readouterr()
    default = float(_table(out).iloc[0]["threshold"])  # the model's calibrated threshold
    assert main([*base, "--threshold", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaeloc: error:") and err.count("\n") == 1 and "--overwrite" in err
    assert f"screened with other settings (threshold: {default:.4g} -> 1.5)" in err
    assert _outputs(out) == stamps  # nothing changed
    assert main([*base, "--threshold", "1.5", "--overwrite"]) == 0
    record = json.loads((out / "scans" / "lesion0" / cohort.RECORD).read_text())
    assert record["settings"]["threshold"] == 1.5
    row = _table(out).iloc[0]
    assert row["threshold"] == 1.5 and not row["reused"]
    assert main([*base, "--threshold", "1.5"]) == 0  # now current: reused
    assert bool(_table(out).iloc[0]["reused"])


def test_a_changed_version_or_setting_is_named(tmp_path):
    """The refusal of a rerun names what changed: each setting with its old and new value,
    else the package version."""
    from napari_vaeloc import __version__
    from napari_vaeloc.pipeline import ScanSettings
    from napari_vaeloc.prepare import PrepareSettings

    then = ScanSettings(model="t2-brain", prepare=PrepareSettings("auto"), smoothing=2.0)
    record = {"settings": then.result_key(), "package": "0.0.1", "row": {"threshold": 3.0}}
    now = ScanSettings(model="t2-brain", prepare=PrepareSettings("auto"), smoothing=2.0)
    assert cohort.settings_change(record, now) == (
        f"another version of napari-vaeloc (0.0.1, now {__version__})"
    )
    now = ScanSettings(
        model="t2-brain", prepare=PrepareSettings("auto", brain_extraction=False), threshold=2.5
    )
    assert cohort.settings_change(record, now) == (
        "other settings (brain extraction: auto -> off; threshold: 3 -> 2.5; "
        "smoothing: 2 -> the preset's)"
    )
    with_maps = dataclasses.replace(then, maps=("restoration",))
    assert cohort.settings_change(record, with_maps) == (
        "other settings (--maps: default -> ['restoration'])"
    )
    assert cohort.settings_change({**record, "settings": with_maps.result_key()}, then) == (
        "other settings (--maps: ['restoration'] -> default)"
    )
    plain = dataclasses.replace(then, outline=False)  # --no-outline
    assert cohort.settings_change(record, plain) == "other settings (outline: the model's -> off)"
    del record["settings"]  # an old record: only the version can be told
    assert "another version" in cohort.settings_change(record, now)


def test_csv_list_with_a_model_per_row(cluster, tmp_path, tiny_model_dir):
    address, _ = cluster
    kinds = make_cohort(tmp_path / "in", 1, 1)
    (tmp_path / "in" / "list.csv").write_text(
        f"scan,model\nhealthy0.nii.gz,{tiny_model_dir}\nlesion0.nii.gz,\n"
    )
    out = tmp_path / "out"
    assert main(screen_args([tmp_path / "in" / "list.csv"], out, "--scheduler", address)) == 0
    df = _table(out).set_index("scan")
    assert df.loc[str(tmp_path / "in" / "healthy0.nii.gz"), "model"] == "tiny"
    assert df.loc[str(tmp_path / "in" / "lesion0.nii.gz"), "model"] == "t2-brain"
    assert len(df) == len(kinds)


@pytest.mark.parametrize(
    ("address", "message", "timeout_s", "within_s"),
    [
        ("foo", "vaeloc: error: the scheduler address 'foo' has no port", 60, 30),
        ("xx://host:8786", "has an unknown protocol xx://", 60, 30),
        ("tcp://127.0.0.1:1", "error: cannot reach the Dask scheduler at tcp://127.0", 1, 25),
    ],
)
def test_a_bad_scheduler_is_one_line(tmp_path, address, message, timeout_s, within_s):
    """A malformed address is refused without trying to connect (well inside a 60 s
    --connect-timeout, whatever the machine's load: the bound includes Python's start and
    imports), an unreachable one after --connect-timeout: one line, exit 2, nothing written,
    and no traceback from Dask's client afterwards (a process of its own: the client's noise
    would come when it is garbage-collected)."""
    make_cohort(tmp_path / "in", 1, 0)
    out = tmp_path / "out"
    args = screen_args(
        [tmp_path / "in"], out, "--scheduler", address, "--connect-timeout", str(timeout_s)
    )
    code = "import sys; from napari_vaeloc.cli import main; sys.exit(main(sys.argv[1:]))"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    seconds = time.monotonic() - start  # with the start of Python and its imports
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("vaeloc: error:") and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert seconds < within_s
    assert not out.exists() or not any(out.iterdir())  # nothing written


@pytest.mark.parametrize(
    "address", ["tcp://sched-host:8786", "sched-host:8786", "tls://10.0.0.1:8786", "[::1]:8786"]
)
def test_scheduler_addresses_of_every_form_are_taken(address):
    assert cohort.check_scheduler_address(f" {address} ") == address


@pytest.mark.parametrize(
    "address", ["", "foo", "tcp://host", "tcp://host:", "tcp://host:x", "tcp://h:0", "ftp://h:21"]
)
def test_malformed_scheduler_addresses_are_refused(address):
    from napari_vaeloc.errors import InputError

    with pytest.raises(InputError, match="tcp://HOST:PORT"):
        cohort.check_scheduler_address(address)


@pytest.mark.parametrize("where", ["option", "csv"])
def test_a_mistyped_model_fails_before_anything_starts(tmp_path, capsys, where):
    """Checked before a cluster starts: one line, exit 2, no output folder (the local
    cluster that would start here needs no --scheduler)."""
    make_cohort(tmp_path / "in", 2, 0)
    out = tmp_path / "out"
    if where == "option":
        args = [*screen_args([tmp_path / "in"], out), "--model", "nosuch"]
        told = "no model named or found at 'nosuch'"
    else:
        (tmp_path / "in" / "list.csv").write_text(
            "scan,model\nhealthy0.nii.gz,t2-brain\nhealthy1.nii.gz,nosuch\n"
        )
        args = screen_args([tmp_path / "in" / "list.csv"], out)
        told = "list.csv, line 3: no model named or found at 'nosuch'"
    start = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.startswith("vaeloc: error:") and told in err and err.count("\n") == 1, err
    assert not out.exists()


def test_joining_a_one_worker_cluster_says_worker(tmp_path, capsys):
    from distributed import LocalCluster

    make_cohort(tmp_path / "in", 1, 0)
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": ":0"},
        silence_logs=logging.ERROR,
    ) as c:
        args = screen_args([tmp_path / "in"], tmp_path / "out", "--scheduler", c.scheduler_address)
        assert main([a for a in args if a != "--quiet"]) == 0
    said = capsys.readouterr().out
    assert f"joined {c.scheduler_address} (1 worker now)" in said, said


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_folder_holding_the_scanned_folder_is_refused(tmp_path, capsys, inside):
    make_cohort(tmp_path / "study", 1, 0)
    out = tmp_path if inside else tmp_path / "study"
    assert main(screen_args([tmp_path / "study"], out)) == 2
    err = capsys.readouterr().err
    if inside:
        told = f"the scanned folder {tmp_path / 'study'} must not lie inside the output folder"
    else:
        told = f"the output folder must not be the scanned folder {tmp_path / 'study'}"
    assert told in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["healthy0.nii.gz"]


def test_the_python_example_of_the_docs_makes_a_folder_the_command_resumes(
    tmp_path, monkeypatch, capsys
):
    """docs/cohort.md's Python example, run as written (its own 2-worker local cluster) on a
    study of one skull-stripped T1 brain; `vaeloc screen` then reuses what it screened."""
    import re
    import runpy
    import shutil

    doc = (Path(__file__).parents[1] / "docs" / "cohort.md").read_text()
    section = doc[doc.index("## Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "study").mkdir()
    shutil.copy(sample_path("t1-healthy"), tmp_path / "study" / "brain.nii.gz")
    (tmp_path / "example.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    assert (tmp_path / "screen" / cohort.MANIFEST).is_file()
    row = _table(tmp_path / "screen").iloc[0]
    assert row["status"] == "done" and row["model"] == "t1-brain"
    capsys.readouterr()
    rc = main(["screen", "study/", "--out", "screen/", "--model", "t1-brain", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    row = _table(tmp_path / "screen").iloc[0]
    assert row["status"] == "done" and bool(row["reused"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: [d / "missing"], "no such file or folder"),
        (lambda d: [(d / "empty").mkdir() or d / "empty"], "no NIfTI scans"),
        (lambda d: [d / "l.csv"], "no 'scan' (or 'path') column"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, make, message):
    (tmp_path / "l.csv").write_text("file\nx.nii.gz\n")
    out = tmp_path / "out"
    assert main(screen_args(make(tmp_path), out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaeloc: error:") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_folder_that_is_not_a_screen_is_refused(tmp_path, capsys):
    make_cohort(tmp_path / "in", 1, 0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(screen_args([tmp_path / "in"], out)) == 2
    err = capsys.readouterr().err
    assert "holds no screen" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_scan_names_are_unique_and_csv_paths_relative(tmp_path):
    """Colliding names get a hash; a CSV lists paths relative to its folder; hidden files
    are passed over."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.nii.gz").write_bytes(gzip.compress(b"junk"))
    (tmp_path / "a" / ".hidden.nii.gz").write_bytes(b"")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.nii.gz").write_bytes(b"")
    (tmp_path / "list.csv").write_text("path\na/x.nii.gz\n")
    jobs, skipped = cohort.find_scans([tmp_path / "a", tmp_path / "b", tmp_path / "list.csv"])
    assert [j.path for j in jobs] == [tmp_path / "a" / "x.nii.gz", tmp_path / "b" / "x.nii.gz"]
    names = [j.name for j in jobs]
    assert len(set(names)) == 2 and all(n.startswith("x-") for n in names)
    assert skipped == []


def test_a_scan_too_large_for_its_worker_fails_with_the_reason(cluster, tmp_path):
    """A scan whose maps would not fit its worker's share of memory (4 GB per worker here) is
    refused by the engine's estimate before it is scored: a reason, not a dead worker."""
    address, client = cluster
    workers = set(client.scheduler_info()["workers"])
    # 117 M voxels: even the maps a run writing them one by one holds at once (three float32),
    # with its working memory, take over the 2 GB a task may use here
    big = np.zeros((512, 512, 448), np.uint8)
    big[100:400, 100:400, 40:400] = 100
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(big, np.eye(4)), tmp_path / "in" / "big.nii.gz")
    out = tmp_path / "out"
    assert main(screen_args([tmp_path / "in"], out, "--scheduler", address)) == 1
    row = _table(out).iloc[0]
    assert row["status"] == "failed"
    assert (
        "GiB" in row["error"]
        and "more than" in row["error"]
        and "crop or downsample" in row["error"]
    )
    assert set(client.scheduler_info()["workers"]) == workers  # no worker died or restarted


@pytest.mark.parametrize("module", ["pipeline", "cohort", "cohort_report"])
def test_the_core_of_a_screen_imports_no_front(module):
    """The pipeline and the cohort runner are core: they import neither the command line nor
    napari or Qt (the command line and the widget call them)."""
    import ast
    import importlib

    source = Path(importlib.import_module(f"napari_vaeloc.{module}").__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            imported |= {base, *(f"{base}.{a.name}" for a in node.names)}
    gui = {"napari", "qtpy", "magicgui"}
    fronts = (".cli", "napari_vaeloc.cli", "._widget", "napari_vaeloc._widget")
    assert not [m for m in imported if m.split(".")[0] in gui or m.startswith(fronts)]


def test_the_thumbnail_names_the_slice_by_its_height_in_the_scan_s_world():
    import nibabel as nib

    from napari_vaeloc.cohort_report import most_anomalous_slice, slice_height_mm

    shape = (20, 24, 16)
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    ras[:3, 3] = [-20.0, -24.0, -30.0]
    data = np.zeros(shape, np.float32)
    data[5:9, 6:10, 11] = 1.0  # one anomalous axial slice, at z = -30 + 3 * 11 = 3 mm
    for codes in (("R", "A", "S"), ("P", "I", "R"), ("L", "I", "A")):  # a cycle and a swap
        ornt = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(codes)
        )
        stored = nib.orientations.apply_orientation(data, ornt)
        affine = ras @ nib.orientations.inv_ornt_aff(ornt, shape)
        k = most_anomalous_slice(stored > 0, stored, affine)
        assert slice_height_mm(affine, stored.shape, k) == pytest.approx(3.0), codes
