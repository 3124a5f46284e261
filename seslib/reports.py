"""Reports: a notebook's report.md with its figures and claims, SUMMARY.md across notebooks."""
from __future__ import annotations

import re
from pathlib import Path

from .util import FIGURE_NOTE, atomic_write_bytes, read_only
from .toy import fig_toy, toy_table
from .results import plan_results
from .claims import SUMMARY_CLAIMS, VERDICT_RULE, VERDICTS, chance_verdicts, check_claim, claim_values, claims_table
from .power import with_power
from .tables import Report, markdown_table, report_title, summary_table, write_report
from .figures import (fig_bars, fig_beta, fig_curves, fig_dynamics, fig_erank, fig_erank_dynamics, fig_erank_final,
                      fig_erank_spread, fig_glue, fig_pareto, fig_per_corruption)


FIGURES = read_only({"bars": fig_bars, "curves": fig_curves, "dynamics": fig_dynamics, "erank": fig_erank,
                     "per_corruption": fig_per_corruption, "pareto": fig_pareto, "beta": fig_beta, "toy": fig_toy,
                     "erank_dynamics": fig_erank_dynamics, "erank_final": fig_erank_final,
                     "erank_spread": fig_erank_spread, "glue": fig_glue})
_PAPER_FIGURES = ("bars", "erank_final", "erank_spread", "glue")  # the figures that draw the paper's numbers beside ours


def report(plan, figures=("bars", "curves"), baseline="baseline", baseline_of=None, show=True):
    """The experiment's report from the results made with the plan's settings (others are left out and named):
    the per-config table (report.md / .csv), the claim verdicts (claims.csv), the figures (PNG; shown inline in a
    notebook unless show=False)."""
    df, left_out = plan_results(plan)
    for d, why in left_out:
        print(f"left out: {d}: {why}")
    if df.empty:
        print(f"no finished runs with these settings under {plan.out_dir}/runs yet")
        return None
    bad = [f for f in figures if f not in FIGURES]
    if bad:
        raise ValueError(f"unknown figure(s) {bad}; known: {', '.join(FIGURES)}")
    order = [c for c in plan.grid if c in set(df["config"])]
    if any(c.get("kind") == "toy" for c in plan.resolved.values()) or \
            "kappa_mean" in df and df["kappa_mean"].notna().all():
        table = toy_table(df, plan.paper)
    else:
        table = summary_table(df, plan.paper, order, baseline, baseline_of, plan.paper_gpu, claims=plan.claims)
    notes = list(plan.notes) + _shared_notes(df, plan.out_dir)
    if table.attrs.get("devices"):
        notes.append(f"our runs: {table.attrs['devices']}" + (f"; the paper's: {plan.paper_gpu}" if plan.paper_gpu else ""))
    claims = with_power(claims_table(df, plan.claims), plan.claims, df) if plan.claims else None
    rep = Report(report_title(plan, df), table, claims, left_out,
                 notes=notes, values=claim_values(df))
    token = FIGURE_NOTE.set(figure_note(plan))
    try:
        for f in figures:
            fn = FIGURES[f]
            kw = ({"paper": plan.paper, "order": order} if f in _PAPER_FIGURES else
                  {"order": order} if f == "per_corruption" else {})
            path = fn(df, plan.out_dir, show=show, **kw)
            if path:
                rep.figures.append(str(path))
    finally:
        FIGURE_NOTE.reset(token)
    write_report(rep, plan.out_dir)
    return rep


PRESET_CAVEATS = read_only({  # what a non-paper preset's results are, in a line (SUMMARY.md, every figure)
    "smoke": "the smoke preset: 1 epoch (the toy study: 20) on a small subset, narrowed or tiny models; a check that "
             "the code runs, its numbers say nothing about the paper"})


def figure_note(plan) -> str:
    """The line under each of a report's figures: its notebook and preset, and 'synthetic data' where it is."""
    synthetic = any(c.get("text_data") == "synthetic" for c in (plan.resolved or {}).values())
    note = f"{plan.name or Path(plan.out_dir).name} · preset {plan.preset}"
    if plan.preset != "paper":
        note += ": " + PRESET_CAVEATS.get(plan.preset, "not the paper's setup")
    return note + (" · SYNTHETIC data (random text, an untrained model)" if synthetic else "")


def _shared_notes(df, out_dir):
    """Where each run this report reads from another notebook's folder was trained (runs.run_key: the same run)."""
    own = Path(out_dir).resolve()
    elsewhere = [f"{r.config} seed {r.seed} ({Path(r.run_dir).parent.parent.name})" for r in df.itertuples()
                 if "run_dir" in df and Path(r.run_dir).resolve().parent.parent != own]
    return [f"runs trained by another notebook (the same config and seed): {', '.join(elsewhere)}"] if elsewhere else []


def summary_claims():
    """SUMMARY_CLAIMS checked (their configs are "NN_notebook/config"; tests check them against the notebooks)."""
    return [check_claim(c, {x for x in [c.get("a"), c.get("b"), *(c.get("terms") or {})] if x}) for c in SUMMARY_CLAIMS]


def _read_csv(path):
    """A report's CSV; one that cannot be read (cut short, edited by hand) is a ValueError naming it and the fix."""
    import pandas as pd
    try:
        return pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        raise ValueError(f"{path}: unreadable ({str(e).splitlines()[0]}); run that notebook's report again "
                         f"(`python sesrun.py batch {path.parent.name}` redoes only its report when its runs are done)") \
            from None


def summary_claims_table(root):
    """The cross-notebook claims judged on every notebook's values.csv under root (Welch: different experiments
    share no randomness even where their seeds agree); None when no notebook has values yet."""
    import pandas as pd
    parts = [_read_csv(p).assign(config=lambda d, nb=p.parent.name: nb + "/" + d["config"].astype(str))
             for p in sorted(Path(root).glob("*/values.csv"))]
    if not parts:
        return None
    df, claims = pd.concat(parts, ignore_index=True), summary_claims()
    return with_power(claims_table(df, claims), claims, df)


def build_summary(root="outputs"):
    """outputs/SUMMARY.md and .csv: one row per claim over every notebook folder under root that has a report
    (each report's claims.csv holds only runs made with its own settings, and names its preset, epochs, seeds),
    then the cross-notebook claims (SUMMARY_CLAIMS) and what chance alone would give."""
    import pandas as pd
    root = Path(root)
    parts = [_read_csv(p).assign(notebook=p.parent.name) for p in sorted(root.glob("*/claims.csv"))]
    if not parts:
        return None
    across = summary_claims_table(root)
    if across is not None:
        parts.append(across.assign(notebook="across notebooks", report="across notebooks (SUMMARY_CLAIMS)"))
    df = pd.concat(parts, ignore_index=True)
    df = df[["notebook"] + [c for c in df.columns if c != "notebook"]]
    n_nb = df.loc[df["notebook"] != "across notebooks", "notebook"].nunique()
    presets = sorted(set(re.findall(r"preset (\w+)", " ".join(df["report"].dropna().astype(str)))))
    caveats = [f"**Preset {p}: {PRESET_CAVEATS.get(p, 'not the paper setup')}.**\n" for p in presets if p != "paper"]
    md = [f"# SES claims: {len(df)} claims, from {n_nb} notebook{'s' if n_nb != 1 else ''} and across notebooks"
          f"{' (preset ' + ', '.join(presets) + ')' if presets else ''}\n", *caveats,
          verdict_counts(df, "verdict") + " (on the paper's metric definitions: best epoch, its robustness protocol)\n",
          verdict_counts(df, "verdict (headline)") + " (on our headline definitions: final epoch, 15 x 5 "
          "corruptions)\n", DESIGN_NOTE + "\n",
          chance_verdicts(int((df["seeds"] >= 2).sum())) + "\n", VERDICT_RULE + "\n"]
    for nb, sub in df.groupby("notebook", sort=True):
        md.append(f"## {sub['report'].iloc[0]}\n\n" + markdown_table(sub.drop(columns=["notebook", "report"]).set_index("claim")))
    atomic_write_bytes(root / "SUMMARY.csv", df.to_csv(index=False).encode())
    atomic_write_bytes(root / "SUMMARY.md", "\n".join(md).encode())
    return df


DESIGN_NOTE = ("Design: fixed seeds. Every config's seeds were set before any result was seen (no sequential design: "
               "adding seeds until a verdict changes would void the rule's error rates). Time claims on our SES "
               "implementation read 'not comparable: implementation differs' and are counted apart. Each row's power "
               "says how often it would read 'reproduced' at max(its seeds, 3) if the paper is right, and how many "
               "seeds 80 % needs: an 'inconclusive' with low power is a question of seeds, not of SES.")


def verdict_counts(df, column) -> str:
    """'12 reproduced, 3 opposite direction, ...' of one verdict column, in VERDICTS order."""
    counts = df[column].value_counts().to_dict() if column in df else {}
    return ", ".join(f"{counts[v]} {v}" for v in VERDICTS if v in counts) or "no verdicts"


def runs_frame(results: dict):
    """{label: result dict (result.json, or {"history": [...]})} as the frame the report figures take."""
    import pandas as pd
    return pd.DataFrame([{"config": label, "seed": r.get("config", {}).get("seed"), "result": r}
                         for label, r in results.items()])
