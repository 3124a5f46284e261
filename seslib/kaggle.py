"""Kaggle packaging: the code dataset (the package, sesrun.py, requirements, notebooks), the driver notebook,
metadata checks, continuation from a previous version's outputs."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .util import atomic_write_json, parse_duration
from .batch import OUTPUTS_MARKER, SETUP_CELL, find_notebooks, load_batch_params, read_params, suite_root
from .planning import KAGGLE, notebook_plan


def kaggle_slug(title):
    """Kaggle's clean-URL slug of a title: lowercase, runs of other characters -> '-'."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


_KAGGLE_USER = r"[A-Za-z0-9][A-Za-z0-9_-]{1,49}"  # a Kaggle user name, as in kaggle.com/<username>


def _check_ref(ref, what, lo, hi, problems):
    owner, _, slug = str(ref).partition("/")
    if not owner or "/" in slug or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug or "") or not lo <= len(slug) <= hi:
        problems.append(f"{what} {ref!r} must be 'owner/slug' with a slug of {lo}-{hi} lowercase letters, digits and hyphens")
    elif not re.fullmatch(_KAGGLE_USER, owner):
        problems.append(f"{what} {ref!r}: the owner {owner!r} is not a Kaggle user name (letters, digits, '-' or '_', "
                        "2-50 characters, as in kaggle.com/<username>)")
    return slug


def validate_kaggle_metadata(path):
    """Check a kernel-metadata.json or dataset-metadata.json (or a folder holding one) before pushing.

    Kernel: required fields, id 'owner/slug' (slug 5-50 chars, lowercase and hyphens), title
    slugifying to the slug, language/kernel_type values, the code file present (a valid notebook for
    kernel_type notebook), boolean flags, source refs. Dataset: title 6-50 chars, slug 3-50, one license.
    Raises ValueError listing every problem; returns the metadata."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("kernel-metadata.json", "dataset-metadata.json") if (path / n).is_file()]
        if not found:
            raise ValueError(f"{path}: no kernel-metadata.json or dataset-metadata.json")
        path = found[0]
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable metadata ({e})") from None
    problems = []
    if path.name == "dataset-metadata.json":
        _dataset_meta_problems(meta, problems)
    else:
        _kernel_meta_problems(meta, path.parent, problems)
    if problems:
        raise ValueError(f"{path}:\n  " + "\n  ".join(problems))
    return meta


def _dataset_meta_problems(meta, problems):
    _check_ref(meta.get("id", ""), "id", 3, 50, problems)
    title = str(meta.get("title", ""))
    if not 6 <= len(title) <= 50:
        problems.append(f"title {title!r} must be 6-50 characters")
    if not isinstance(meta.get("licenses"), list) or len(meta["licenses"]) != 1 or "name" not in meta["licenses"][0]:
        problems.append("licenses must hold exactly one {'name': ...}")


def _kernel_meta_problems(meta, folder, problems):
    missing = [k for k in ("id", "title", "code_file", "language", "kernel_type") if not meta.get(k)]
    if missing:
        problems.append(f"missing field(s) {missing}")
    slug = _check_ref(meta.get("id", ""), "id", 5, 50, problems)
    title = str(meta.get("title", ""))
    if len(title) < 5 or kaggle_slug(title) != slug:
        problems.append(f"title {title!r} must be >= 5 characters and slugify to the id's slug {slug!r} "
                        f"(it gives {kaggle_slug(title)!r})")
    if meta.get("language") not in ("python", "r", "rmarkdown"):
        problems.append(f"language {meta.get('language')!r} must be python, r or rmarkdown")
    if meta.get("kernel_type") not in ("script", "notebook"):
        problems.append(f"kernel_type {meta.get('kernel_type')!r} must be script or notebook")
    for k in ("is_private", "enable_gpu", "enable_internet", "enable_tpu"):
        if k in meta and meta[k] not in (True, False, "true", "false"):
            problems.append(f"{k} must be true or false, got {meta[k]!r}")
    for k, kind in (("dataset_sources", "dataset"), ("kernel_sources", "kernel"), ("competition_sources", None)):
        v = meta.get(k, [])
        if not isinstance(v, list):
            problems.append(f"{k} must be a list")
        elif kind:
            for ref in v:
                _check_ref(ref, f"{k} entry", 3 if kind == "dataset" else 5, 50, problems)
    if "machine_shape" in meta and not (isinstance(meta["machine_shape"], str) and meta["machine_shape"]):
        problems.append("machine_shape must be a non-empty string such as 'NvidiaTeslaT4'")
    _code_file_problems(meta, folder, problems)


def _code_file_problems(meta, folder, problems):
    """The kernel's code file is there (and a valid notebook for kernel_type notebook)."""
    code = folder / str(meta.get("code_file", ""))
    if meta.get("code_file") and not code.is_file():
        problems.append(f"code file {code} not found")
    elif meta.get("code_file") and meta.get("kernel_type") == "notebook":
        import nbformat
        try:
            nbformat.validate(nbformat.read(str(code), as_version=4))
        except Exception as e:
            problems.append(f"code file {code.name} is not a valid notebook ({str(e).splitlines()[0]})")


def copy_previous_outputs(dest, inputs="/kaggle/input", log=print) -> list:
    """Continuation across Kaggle kernel versions: copy every earlier outputs root found under `inputs` (the previous
    version's output, attached as this kernel's input: <inputs>/<slug>/outputs/, marked by ses-outputs.txt, up to 5
    folders deep) into `dest`, never over a file dest already has. Results, checkpoints, progress.json, logs and
    reports come along, so done runs are skipped and paused ones resume. Returns the roots copied from."""
    dest = Path(dest).resolve()
    found = {m.parent.resolve() for k in range(1, 6) for m in Path(inputs).glob("/".join(["*"] * k) + "/" + OUTPUTS_MARKER)}
    roots = sorted(r for r in found - {dest} if not any(o in r.parents for o in found))  # outermost roots only
    for root in roots:
        n = size = 0
        for dirpath, _, files in os.walk(root):
            for f in files:
                src = Path(dirpath) / f
                if f.endswith(".tmp") or f == ".lock":  # a write cut short, or a lock: not data
                    continue
                target = dest / src.relative_to(root)
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                shutil.copy2(src, tmp)  # then renamed: an interrupted copy never leaves half a checkpoint
                os.replace(tmp, target)
                n, size = n + 1, size + target.stat().st_size
        log(f"continuation: copied {n} file(s), {size / 2**30:.2f} GiB, from {root} into {dest}")
    if not roots:
        log(f"continuation: no earlier outputs under {inputs} (a first version starts from scratch)")
    return roots


# The driver notebook's setup, after SETUP_CELL (str.format: {data_slug!r} is the data set's slug).
_KAGGLE_DATA_CELL = """\
# The data set attached as a Kaggle dataset -> SES_DATA (the notebooks' data_root default).
_data = [p for k in (1, 2, 3) for p in glob.glob("/kaggle/input" + "/*" * k) if os.path.basename(p) == {data_slug!r}]
if _data:
    os.environ.setdefault("SES_DATA", _data[0])
print("seslib from", _dirs[:1], "| data from", os.environ.get("SES_DATA"))
# Install only what this image lacks (a blanket `pip install -r` could swap Kaggle's torch).
# Everything the runs need (seslib.preflight checks it again before each run): papermill & co for the runner, timm
# (ViTs, Mixup/CutMix), torchmetrics (the robustness pass), transformers (Exp 22's BERT; Kaggle's image has it), and
# the frost photos of imagecorruptions (--no-deps: only its image files are read; its own dependencies would pull an
# OpenCV build).
_need = {{"papermill": "papermill", "nbformat": "nbformat", "yaml": "pyyaml", "timm": "timm", "torchmetrics": "torchmetrics",
         "seaborn": "seaborn", "ipykernel": "ipykernel", "pandas": "pandas", "tqdm": "tqdm",
         "transformers": "transformers"}}
_missing = [pkg for mod, pkg in _need.items() if importlib.util.find_spec(mod) is None]
import subprocess
if _missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *_missing], check=True)
if importlib.util.find_spec("imagecorruptions") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "imagecorruptions"], check=True)
"""


def _driver_notebook(notebooks, data_dataset, out_dir, preset, time_budget="11.5h", plan=None):
    import nbformat
    v4 = nbformat.v4
    find_data = _KAGGLE_DATA_CELL.format(data_slug=data_dataset.split("/")[1])
    cells = [
        v4.new_markdown_cell(
            "# SES experiments: batch run on Kaggle (GPU T4 ×2)\n\n"
            "Runs the experiment notebooks with `sesrun.run_batch`: one papermill process per GPU, longest runs first. "
            f"Outputs (results JSON, figures, reports, `batch_summary.csv`) go to `{out_dir}`. "
            "Edit the parameters cell to choose notebooks and the preset; re-running resumes (done runs are skipped).\n\n"
            "**Across versions.** The batch stops starting runs that cannot finish within `TIME_BUDGET` and pauses the "
            "runs in flight at an epoch boundary (a version stops at 12 hours). When this kernel lists its own output "
            "as an input (`sesrun.py kaggle --continue-from self`), the next version first copies the previous "
            "version's outputs into place, so done runs are skipped and paused runs resume: push again until the "
            "summary says nothing is left to do."),
        v4.new_code_cell(SETUP_CELL + find_data),
        v4.new_code_cell(
            f"NOTEBOOKS = {[str(n) for n in notebooks]!r}  # numbers, stems or 'all'\n"
            f"PRESET = {preset!r}  # 'paper' (published setup) or 'smoke' (tiny, minutes)\n"
            "EXTRA = {}  # more overrides for every notebook, e.g. {'epochs': 10}\n"
            f"OUT = {out_dir!r}\n"
            f"TIME_BUDGET = {time_budget!r}  # this version's share of Kaggle's 12 h: the rest is setup and reports\n"
            "CONTINUE = True  # first copy the previous version's outputs (an attached kernel output) into OUT\n"
            "GPU_CHECK = True  # once (no OUT/gpu_check.json yet): bench/gpu_check.py measures this GPU in a few minutes; "
            "the batch then times and places the runs by it\n"
            f"PLAN = {plan or {}!r}  # per notebook: the configs and seeds to run (`sesrun.py plan --budget`)"),
        v4.new_code_cell(
            "!nvidia-smi -L\n"
            "import sesrun as R\n"
            "if CONTINUE:\n"
            "    R.copy_previous_outputs(OUT)\n"
            "if GPU_CHECK and not os.path.exists(os.path.join(OUT, 'gpu_check.json')):  # its FAIL lines do not stop "
            "the batch\n"
            "    !{sys.executable} {os.path.join(_dirs[0], 'bench', 'gpu_check.py')} --out {OUT}\n"
            "records = R.run_batch(NOTEBOOKS, params={'all': {'preset': PRESET, **EXTRA}, **PLAN}, gpus='auto', "
            "out=OUT,\n"
            "                      time_budget=TIME_BUDGET)"),
        v4.new_code_cell(
            "import pandas as pd\n"
            "failed = [r for r in records if r['status'] == 'failed']\n"
            "display(pd.DataFrame(records))\n"
            "left = [r for r in records if r['status'] in ('paused', 'to do')]\n"
            "print(f'{len(left)} run(s) paused or to do: push this kernel again to go on' if left else 'all runs done')\n"
            "if failed:  # the kernel version then ends as an error on Kaggle, not 'successful'\n"
            "    raise RuntimeError(f\"{len(failed)} run(s) failed: \" + '; '.join(\n"
            "        f\"{r['notebook']} {r['config'] or ''} seed {r['seed']}: {r['error']}\" for r in failed[:5]))"),
    ]
    nb = v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def _check_time_budget(time_budget):
    """A version's time budget: a duration that leaves Kaggle's setup and reports inside its 12-hour limit."""
    limit_h = KAGGLE["version_hours"] - KAGGLE["overhead_hours"]
    if parse_duration(time_budget) > limit_h * 3600:
        raise ValueError(f"--time-budget {time_budget}: a Kaggle version stops at {KAGGLE['version_hours']:g} h, "
                         f"setup and reports take about {KAGGLE['overhead_hours']:g} h: give at most {limit_h:g}h "
                         "(11.5h leaves room for the first version's GPU check)")


def _check_plan_configs(overrides, preset):
    """Each notebook's configs and seeds from the params, planned here as the kernel's listing will plan them: an
    unknown config is one line now, not a failed listing on Kaggle."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for nb, o in overrides.items():
            if "configs" in o or "seeds" in o:
                notebook_plan(nb, **{"preset": preset, **o, "out_dir": str(Path(tmp) / nb.stem)})


def kaggle_package(out, notebooks="all", username=None, slug="ses-batch-t4x2", data_dataset=None,
                   code_dataset=None, preset="paper", continue_from=None, time_budget="11.5h", params=None):
    """Write a ready-to-push Kaggle kernel folder `out` and the seslib code dataset in `out/code-dataset`.

    Push with: `kaggle datasets create -p OUT/code-dataset --dir-mode zip` (once; `kaggle datasets version
    --dir-mode zip` after),
    then `kaggle kernels push -p OUT`. The kernel runs the batch over both T4s into /kaggle/working/outputs."""
    import nbformat
    if not username or not re.fullmatch(_KAGGLE_USER, str(username)):
        raise ValueError(f"--username {username!r} is not a Kaggle user name (letters, digits, '-' or '_', no "
                         "spaces): the one in your profile URL kaggle.com/<username>")
    data_dataset = data_dataset or f"{username}/ses-data"
    code_dataset = code_dataset or f"{username}/seslib-code"
    out = Path(out)
    nbs = find_notebooks(notebooks)
    _check_time_budget(time_budget)  # a bad budget fails here, not on Kaggle
    plan = read_params(params) if params else None  # a plan --budget params file, checked here
    if plan:
        _check_plan_configs(load_batch_params(plan, nbs), preset)
    kernel_meta, data_meta = _kaggle_metadata(username, slug, data_dataset, code_dataset, continue_from)
    if out.exists() and any(out.iterdir()) and not (out / "kernel-metadata.json").is_file():
        raise ValueError(f"--out {out} exists and is not a kernel bundle written by this command: choose another folder")
    # built in a temporary folder beside `out` and moved in place only once complete and valid: a failure
    # never leaves a half-written bundle (nor touches the previous one)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds = _write_code_dataset(tmp / "code-dataset", nbs, data_meta)
        driver = _driver_notebook([nb.stem for nb in nbs], data_dataset, "/kaggle/working/outputs", preset, time_budget,
                                  plan)
        nbformat.write(driver, str(tmp / kernel_meta["code_file"]))
        atomic_write_json(tmp / "kernel-metadata.json", kernel_meta)
        validate_kaggle_metadata(tmp / "kernel-metadata.json")
        validate_kaggle_metadata(ds / "dataset-metadata.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _kaggle_metadata(username, slug, data_dataset, code_dataset, continue_from):
    """(kernel-metadata.json, the code dataset's dataset-metadata.json) of the bundle, every reference checked."""
    kernel_meta = {
        "id": f"{username}/{slug}", "title": slug.replace("-", " "), "code_file": f"{slug}.ipynb",
        "language": "python", "kernel_type": "notebook", "is_private": True, "enable_gpu": True,
        "enable_internet": True, "machine_shape": "NvidiaTeslaT4",  # T4 x2
        "dataset_sources": [data_dataset, code_dataset], "competition_sources": [],
        # continuation: the previous version's output as an input ("self": this kernel's own, once it exists)
        "kernel_sources": [] if not continue_from else [f"{username}/{slug}" if continue_from == "self" else continue_from]}
    code_slug = code_dataset.split("/")[-1]
    data_meta = {"title": code_slug.replace("-", " "), "id": code_dataset, "licenses": [{"name": "CC0-1.0"}]}
    problems = []
    for ref, lo in ((data_dataset, 3), (code_dataset, 3), (kernel_meta["id"], 5), *((k, 5) for k in kernel_meta["kernel_sources"])):
        _check_ref(ref, "reference", lo, 50, problems)
    if problems:
        raise ValueError("; ".join(problems))
    return kernel_meta, data_meta


def _write_code_dataset(ds, nbs, data_meta) -> Path:
    """The code dataset folder: the seslib package (its one sub-folder: push with `--dir-mode zip`, which Kaggle
    unpacks; the setup cell also unpacks a seslib.zip left as is), sesrun.py, requirements.txt, bench/gpu_check.py
    and the notebooks, and its metadata."""
    ds.mkdir(parents=True)
    here = suite_root()
    shutil.copytree(here / "seslib", ds / "seslib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in (here / "sesrun.py", here / "requirements.txt"):
        shutil.copy2(f, ds / f.name)
    (ds / "bench").mkdir()
    shutil.copy2(here / "bench" / "gpu_check.py", ds / "bench" / "gpu_check.py")  # the driver's first-version check
    for nb in nbs:
        shutil.copy2(nb, ds / nb.name)
    atomic_write_json(ds / "dataset-metadata.json", data_meta)
    return ds
