"""Tables: ours beside the paper per config, the report's markdown tables."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .util import atomic_write_bytes
from .corruptions import corruption_error_vs_baseline
from .claims import VERDICT_RULE, claim_baselines


# ── tables ───────────────────────────────────────────────────────────────────────────────────────

def _fmt(mean, std, n):
    if mean != mean:  # NaN
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _stats(df, config, col):
    """(mean, sd, n) of one config's runs in column col, NaNs left out: the per-config table's cells."""
    v = df.loc[df["config"] == config, col].astype(float).dropna()
    return float(v.mean()) if len(v) else float("nan"), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def rob_label(df) -> str:
    """What the standard robustness column really averages, read off the results ("15×5 mean" only when it is)."""
    robs = [r.get("final", {}).get("robustness") for r in df["result"]] if len(df) else []
    robs = [r for r in robs if r]
    if not robs:
        return "rob (standard)"
    nc = {len(r.get("corruptions", [])) for r in robs}
    ns = {len(r.get("severities", [])) for r in robs}
    ni = {r.get("n_images") for r in robs}
    txt = "/".join(map(str, sorted(nc))) + "×" + "/".join(map(str, sorted(ns)))
    return f"rob ({txt} mean, {'/'.join(str(n) for n in sorted(ni))} images)"


def _memory_cells(st, p) -> dict:
    """The cost table's memory columns, for GPU runs or where the paper states its VRAM: the measured peak
    (max_memory_allocated), estimate_memory's figure made at the run's start, the paper's vram_peak_gb; decimal GB."""
    cells = {"peak mem GB": st["peak_mem_gb"][0], "est. peak GB": st["peak_mem_est_gb"][0]}
    cells = {k: round(v, 2) if v == v else None for k, v in cells.items()}
    if "vram_gb" not in p and all(v is None for v in cells.values()):
        return {}
    return {**cells, "paper VRAM GB": p.get("vram_gb")}


def summary_table(df, paper=None, order=None, baseline="baseline", baseline_of=None, paper_gpu=None, claims=None):
    """Per config: ours (mean ± sd over seeds, n) on both metric definitions beside the paper's numbers, the Δ vs
    the config's baseline (ours on both definitions, the paper's), robustness on both protocols, time and memory.
    A config's baseline: baseline_of[config], else the b its claims compare it with (claim_baselines), else
    `baseline` (when that config has results)."""
    import pandas as pd
    paper, baseline_of = paper or {}, {**claim_baselines(claims), **(baseline_of or {})}
    if df.empty:
        return pd.DataFrame()
    configs = [c for c in (order or list(dict.fromkeys(df["config"]))) if c in set(df["config"])]
    rl = rob_label(df)
    rows = []
    for c in configs:
        st = {k: _stats(df, c, k) for k in ("acc_final", "acc_best", "gap", "rob", "rob_paper", "rob_paper_best",
                                            "train_s", "eval_s", "peak_mem_gb", "peak_mem_est_gb")}
        n = st["acc_final"][2]
        p = paper.get(c, {})
        b = baseline_of.get(c, baseline)
        row = {"config": c, "seeds": n,
               "acc (final epoch)": _fmt(*st["acc_final"]), "acc (best epoch, test-selected)": _fmt(*st["acc_best"]),
               "paper acc (best epoch)": p.get("acc"),
               "gap": _fmt(*st["gap"]), "paper gap": p.get("gap"),
               rl: _fmt(*st["rob"]), "rob paper protocol (final)": _fmt(*st["rob_paper"]),
               "rob paper protocol (test-selected, as the paper)": _fmt(*st["rob_paper_best"]),
               "paper rob": p.get("rob"),
               # time = the training loop alone (the author's avg_epoch_time); evaluation + erank passes apart
               "s/epoch": round(st["train_s"][0], 1) if st["train_s"][0] == st["train_s"][0] else None,
               "paper s/epoch": p.get("epoch_s"),
               "eval s/epoch": round(st["eval_s"][0], 1) if st["eval_s"][0] == st["eval_s"][0] else None}
        row.update(_memory_cells(st, p))
        if b != c and b in set(df["config"]):
            bs = {k: _stats(df, b, k)[0] for k in st}
            pb = paper.get(b, {})

            def pd_(k):
                return round(p[k] - pb[k], 2) if p.get(k) is not None and pb.get(k) is not None else None
            row.update({"vs": b, "Δ acc final": round(st["acc_final"][0] - bs["acc_final"], 2),
                        "Δ acc best": round(st["acc_best"][0] - bs["acc_best"], 2), "paper Δ acc": pd_("acc"),
                        "Δ gap": round(st["gap"][0] - bs["gap"], 2), "paper Δ gap": pd_("gap"),
                        "Δ rob": round(st["rob"][0] - bs["rob"], 2),
                        "Δ rob paper (test-selected)": round(st["rob_paper_best"][0] - bs["rob_paper_best"], 2),
                        "paper Δ rob": pd_("rob")})
            mr, mb = _seed_mean_rob(df, c), _seed_mean_rob(df, b)
            if mr and mb:  # Hendrycks & Dietterich's mCE, normalised by this config's baseline (no AlexNet run here)
                ce = corruption_error_vs_baseline(mr, mb)
                row.update({"mCE vs baseline %": round(ce["mce"], 1), "relative mCE %": round(ce["relative_mce"], 1)})
            if st["train_s"][0] == st["train_s"][0] and bs["train_s"] == bs["train_s"] and bs["train_s"]:
                row["SES overhead %"] = round(100 * (st["train_s"][0] / bs["train_s"] - 1), 1)
            if p.get("epoch_s") and pb.get("epoch_s"):
                row["paper overhead %"] = round(100 * (p["epoch_s"] / pb["epoch_s"] - 1), 1)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("config")
    gpus = sorted({g for g in df["device_name"] if g})
    table.attrs["devices"] = ", ".join(gpus)
    table.attrs["paper_gpu"] = paper_gpu
    return table


def _seed_mean_rob(df, config):
    """The standard-protocol robustness of a config averaged over its seeds (accuracy[c][s], clean_acc), or None."""
    robs = [r["final"].get("robustness") for r in df.loc[df["config"] == config, "result"]]
    robs = [r for r in robs if r and r.get("accuracy")]
    if not robs:
        return None
    acc = {n: {s: float(np.mean([r["accuracy"][n][s] for r in robs if s in r["accuracy"].get(n, {})]))
               for s in robs[0]["accuracy"][n]} for n in robs[0]["accuracy"]}
    return {"accuracy": acc, "clean_acc": float(np.mean([r["clean_acc"] for r in robs]))}


_TABLE_GROUPS = {  # report.md shows the wide table as three readable ones
    "accuracy and gap": ("seeds", "acc (final epoch)", "acc (best epoch, test-selected)", "paper acc (best epoch)",
                         "vs", "Δ acc final", "Δ acc best", "paper Δ acc", "gap", "paper gap", "Δ gap", "paper Δ gap"),
    "robustness": ("seeds", "rob (", "rob paper protocol (final)", "rob paper protocol (test-selected, as the paper)",
                   "paper rob", "vs", "Δ rob", "Δ rob paper (test-selected)", "paper Δ rob", "mCE vs baseline %",
                   "relative mCE %"),
    "cost": ("seeds", "s/epoch", "paper s/epoch", "eval s/epoch", "vs", "SES overhead %", "paper overhead %",
             "peak mem GB", "est. peak GB", "paper VRAM GB"),
}


def _split_table(table):
    out = {}
    for name, cols in _TABLE_GROUPS.items():
        keep = [c for c in table.columns if any(c == k or (k.endswith("(") and c.startswith(k)) for k in cols)]
        if len(keep) > 1:
            out[name] = table[keep]
    return out or {"results": table}


def markdown_table(table) -> str:
    cols = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        cells = ["—" if v is None or (isinstance(v, float) and v != v) else str(v) for v in row.tolist()]
        lines.append("| " + " | ".join([str(idx)] + cells) + " |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Report:
    """A notebook's report: title, tables, claim verdicts, the results left out. Shown as HTML in notebooks."""
    title: str
    table: object  # the wide per-config table (report.csv)
    claims: object  # claims_table (claims.csv)
    left_out: list
    figures: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    values: object = None  # one row per run: config, seed and every claim metric (values.csv, for SUMMARY_CLAIMS)

    def markdown(self) -> str:
        parts = [f"# {self.title}\n"] + [f"{n}\n" for n in self.notes]
        for name, t in _split_table(self.table).items():
            parts.append(f"## {name}\n\n{markdown_table(t)}")
        if self.claims is not None and len(self.claims):
            parts.append(f"## the paper's claims\n\n{markdown_table(self.claims.set_index('claim'))}\n{VERDICT_RULE}\n")
        if self.left_out:
            parts.append("## left out (made with other settings)\n\n" + "".join(f"- {d}: {why}\n" for d, why in self.left_out))
        if self.figures:
            parts.append("## figures\n\n" + "".join(f"![{Path(f).stem}](figures/{Path(f).name})\n" for f in self.figures))
        return "\n".join(parts)

    def _repr_html_(self):
        html = [f"<h3>{self.title}</h3>"] + [f"<p>{n}</p>" for n in self.notes]
        for name, t in _split_table(self.table).items():
            html.append(f"<h4>{name}</h4>" + t.to_html(na_rep="—"))
        if self.claims is not None and len(self.claims):
            html.append("<h4>the paper's claims</h4>" + self.claims.to_html(index=False, na_rep="—")
                        + f"<p><small>{VERDICT_RULE}</small></p>")
        if self.left_out:
            html.append("<h4>left out (made with other settings)</h4><ul>"
                        + "".join(f"<li>{d}: {why}</li>" for d, why in self.left_out) + "</ul>")
        return "\n".join(html)

    def __repr__(self):
        return self.markdown()


def report_title(plan, df) -> str:
    cfg = next(iter(plan.resolved.values()), {}) if plan.resolved else {}
    seeds = sorted({int(s) for s in df["seed"]}) if len(df) else plan.seeds
    e = cfg.get("epochs", "?")
    return (f"{plan.name or Path(plan.out_dir).name}: preset {plan.preset}, {e} epoch{'s' if e != 1 else ''}, "
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} {seeds}")


def write_report(rep: Report, out_dir):
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "report.md", rep.markdown().encode())
    atomic_write_bytes(out_dir / "report.csv", rep.table.to_csv().encode())
    claims = rep.claims if rep.claims is not None else None
    if claims is not None and len(claims):
        atomic_write_bytes(out_dir / "claims.csv", claims.assign(report=rep.title).to_csv(index=False).encode())
    else:
        (out_dir / "claims.csv").unlink(missing_ok=True)
    if rep.values is not None:
        atomic_write_bytes(out_dir / "values.csv", rep.values.to_csv(index=False).encode())
