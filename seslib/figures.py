"""Figures: bars, curves, erank, per-corruption, Pareto, beta schedules, GLUE, Exp 28's erank dynamics."""
from __future__ import annotations


from .util import MAX_FIG_INCHES, save_figure
from .data import GLUE_TASKS


def _history_frame(df):
    import pandas as pd
    rows = []
    for _, r in df.iterrows():
        for h in r["result"].get("history", []):
            rows.append({"config": r["config"], "seed": r["seed"], **{k: v for k, v in h.items() if not isinstance(v, dict)}})
    return pd.DataFrame(rows)


def config_palette(configs) -> dict:
    """{config: colour} in first-seen order: every panel of a figure draws a config in the same colour, whatever
    configs have values there (the baseline has no SES term)."""
    import seaborn as sns
    order = list(dict.fromkeys(configs))
    return dict(zip(order, sns.color_palette(n_colors=len(order))))


def _palette_legend(fig, palette, ncol=7, line=False):
    """One legend below the axes with every config of the palette, drawn as lines or bar patches."""
    import matplotlib.pyplot as plt
    handles = [plt.Line2D([], [], color=c) if line else plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    fig.legend(handles, list(palette), loc="lower center", ncol=min(ncol, len(palette)), fontsize=8, frameon=False)


def _label_bars(ax, fmt="%.1f"):
    """The value on every bar, and a bar of height 0 drawn as a thick line at 0 in its colour: otherwise it is
    invisible, and a series of zeros looks like a missing one."""
    for bars in ax.containers:
        ax.bar_label(bars, fmt=fmt, fontsize=6, padding=1)
        for bar in bars:
            if bar.get_height() == 0:
                ax.plot([bar.get_x(), bar.get_x() + bar.get_width()], [0, 0], color=bar.get_facecolor(), lw=4,
                        solid_capstyle="butt", clip_on=False)


def _series_colours():
    """One colour per role in every panel: ours on our headline definition, ours on the paper's, the paper's."""
    import seaborn as sns
    ours, ours_paper_def, paper = sns.color_palette(n_colors=3)
    return {"ours: final epoch": ours, "ours: standard 15×5": ours, "ours: best epoch (test-selected)": ours_paper_def,
            "ours: paper protocol, test-selected": ours_paper_def, "paper": paper}


def fig_bars(df, out_dir, paper=None, order=None, name="bars", show=True):
    """Accuracy, gap and robustness per config (mean ± sd over seeds): ours on our headline definition, ours on
    the paper's definition, and the paper's number; the legend sits below the axes, never on a bar."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns
    paper = paper or {}
    order = [c for c in (order or list(dict.fromkeys(df["config"]))) if c in set(df["config"])]
    panels = {  # metric -> [(column, series name)], the paper's key
        "test accuracy (%)": ([("acc_final", "ours: final epoch"), ("acc_best", "ours: best epoch (test-selected)")], "acc"),
        "train − test gap (pp)": ([("gap", "ours: final epoch")], "gap"),
        "corruption accuracy (%)": ([("rob", "ours: standard 15×5"),
                                     ("rob_paper_best", "ours: paper protocol, test-selected")], "rob"),
    }
    width = min(MAX_FIG_INCHES, max(9, 1.1 * len(order) * 3))
    fig, axes = plt.subplots(1, 3, figsize=(width, 4.4))
    for ax, (title, (series, pkey)) in zip(axes, panels.items()):
        long = pd.concat([df[["config", col]].rename(columns={col: "value"}).assign(series=lab) for col, lab in series]
                         + [pd.DataFrame([{"config": c, "value": paper[c][pkey], "series": "paper"}
                                          for c in order if (paper.get(c) or {}).get(pkey) is not None])],
                         ignore_index=True).dropna(subset=["value"])
        if not long.empty:
            sns.barplot(data=long, x="config", y="value", hue="series", order=order, ax=ax, errorbar="sd",
                        hue_order=[h for h in [lab for _, lab in series] + ["paper"] if h in set(long["series"])],
                        palette=_series_colours())
            _label_bars(ax)
            lo, hi = long["value"].min(), long["value"].max()
            if pkey != "gap" and hi > 0:  # zoomed in to show differences of a point: the title says so
                ax.set_ylim(max(0, lo - 0.15 * (hi - lo) - 1), hi + 0.1 * (hi - lo) + 1)
            elif pkey != "gap":  # every bar 0: an axis of 0..1 rather than ±0.04 around nothing
                ax.set_ylim(0, 1)
        bottom = ax.get_ylim()[0]
        ax.set_title(title + (f"\naxis from {bottom:.0f}, not 0" if pkey != "gap" and bottom > 0.5 else ""),
                     fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=40, labelsize=8)
        handles, labels = ax.get_legend_handles_labels()
        if ax.get_legend():
            ax.get_legend().remove()
        if handles:
            ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), frameon=False)
    return save_figure(fig, out_dir, name, show)


def fig_glue(df, out_dir, paper=None, order=None, name="glue", show=True):
    """Exp 22 as the author's figures show it, one column per GLUE task: dev accuracy (ours at the final epoch, ours at
    the best epoch as the author's best_val_acc, the paper's) and the train − dev gap (ours, the paper's) of each
    variant (the config name after the task: baseline, ses_l4, ses_all), mean ± sd over seeds."""
    import matplotlib.pyplot as plt
    tasks = {r["config"]: r["result"]["config"].get("task", "?") for _, r in df.iterrows()}
    order = [c for c in (order or list(dict.fromkeys(df["config"]))) if c in tasks]
    columns = list(dict.fromkeys(tasks[c] for c in order))
    rows = (("dev accuracy (%)", [("acc_final", "ours: final epoch"),
                                  ("acc_best", "ours: best epoch (dev-selected, as the paper)")], "acc"),
            ("train − dev gap (pp)", [("gap", "ours: final epoch")], "gap"))
    fig, axes = plt.subplots(2, len(columns), figsize=(min(MAX_FIG_INCHES, 5.2 * len(columns) + 1), 8.5),
                             squeeze=False)
    for j, task in enumerate(columns):
        configs = [c for c in order if tasks[c] == task]
        for i, (title, series, pkey) in enumerate(rows):
            ax = axes[i][j]
            _glue_panel(ax, df, configs, series, paper or {}, pkey, task)
            ax.set_title(f"{GLUE_TASKS.get(task, {}).get('name', task)}: {title}" + (
                f"\naxis from {ax.get_ylim()[0]:.0f}, not 0" if pkey == "acc" and ax.get_ylim()[0] > 0.5 else ""),
                fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_dir, name, show)


def _glue_panel(ax, df, configs, series, paper, pkey, task):
    """One fig_glue panel: bars per variant (x) and series (hue), the paper's beside ours, values on the bars."""
    import pandas as pd
    import seaborn as sns
    label = {c: c[len(task) + 1:] if c.startswith(f"{task}_") else c for c in configs}
    sub = df[df["config"].isin(configs)]
    long = pd.concat([sub[["config", col]].rename(columns={col: "value"}).assign(series=lab) for col, lab in series]
                     + [pd.DataFrame([{"config": c, "value": paper[c][pkey], "series": "paper"}
                                      for c in configs if (paper.get(c) or {}).get(pkey) is not None])],
                     ignore_index=True).dropna(subset=["value"])
    if long.empty:
        return
    long["variant"] = long["config"].map(label)
    names = [lab for _, lab in series] + ["paper"]
    colours = dict(zip(["ours: final epoch", "ours: best epoch (dev-selected, as the paper)", "paper"],
                       sns.color_palette(n_colors=3)))  # one colour per series in every panel
    sns.barplot(data=long, x="variant", y="value", hue="series", order=[label[c] for c in configs], ax=ax,
                errorbar="sd", hue_order=[h for h in names if h in set(long["series"])], palette=colours)
    _label_bars(ax, "%.2f")
    lo, hi = long["value"].min(), long["value"].max()
    if pkey == "acc" and hi > 0:  # zoomed in to show differences of a fraction of a point: the title says so
        ax.set_ylim(max(0, lo - 0.3 * (hi - lo) - 1), hi + 0.15 * (hi - lo) + 0.5)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False, ncol=2)


def fig_curves(df, out_dir, name="curves", metrics=("test_acc", "train_loss", "gap"), log=(), show=True):
    """Per-epoch curves per config (mean over seeds, shaded sd); metrics named in `log` on a log scale."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    hist = _history_frame(df)
    metrics = [m for m in metrics if m in hist.columns and hist[m].notna().any()]
    if hist.empty or not metrics:
        return None
    titles = {"ses_term": "SES term λ·Σ(H−β log d)² (as in the loss)", "train_loss_total": "train loss incl. SES term",
              "ses_loss": "Σ(H−β log d)² (λ not applied)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(min(MAX_FIG_INCHES, 4.3 * len(metrics)), 3.8), squeeze=False)
    palette = config_palette(hist["config"])  # a config keeps its colour in a panel where another has no values
    for ax, m in zip(axes[0], metrics):
        sns.lineplot(data=hist.dropna(subset=[m]), x="epoch", y=m, hue="config", palette=palette, ax=ax,
                     errorbar="sd", marker="o" if hist["epoch"].nunique() < 5 else None, legend=False)
        ax.set_title(titles.get(m, m.replace("_", " ")), fontsize=10)
        if m in log:
            ax.set_yscale("log")
    _palette_legend(fig, palette, line=True)
    fig.subplots_adjust(bottom=0.25)
    return save_figure(fig, out_dir, name, show)


def fig_erank(df, out_dir, name="erank", show=True):
    """Per-layer effective rank over epochs relative to its target d^β (1 = on target), measured two ways, each
    against its own target line: as SES sees it (training batch size, train mode) and as the SES author measured
    it (2048 test images, eval mode). erank grows with the number of samples: only the first compares with the
    target SES pulls towards."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns
    views = {"erank": "as SES sees it (train mode, {n} train images per batch)",
             "erank_author": "as the author measured it (eval mode, {n} test images)"}
    rows = []
    for _, r in df.iterrows():
        for h in r["result"].get("history", []):
            for view in views:
                for layer, st in (h.get(view) or {}).items():
                    rows.append({"config": r["config"], "epoch": h["epoch"], "layer": layer, "ratio": st["ratio"],
                                 "view": view, "n": st.get("samples")})
    if not rows:
        return None
    er = pd.DataFrame(rows)
    configs, present = list(dict.fromkeys(er["config"])), [v for v in views if v in set(er["view"])]
    fig, axes = plt.subplots(len(present), len(configs), figsize=(min(MAX_FIG_INCHES, 3.6 * len(configs) + 1.5),
                                                                  3.2 * len(present)), squeeze=False, sharey="row")
    for i, view in enumerate(present):
        for j, c in enumerate(configs):
            sub = er[(er["config"] == c) & (er["view"] == view)]
            ax = axes[i][j]
            sns.lineplot(data=sub, x="epoch", y="ratio", hue="layer", ax=ax, errorbar=None, legend=j == len(configs) - 1,
                         marker="o" if er["epoch"].nunique() < 5 else None)
            ax.axhline(1.0, color="k", ls="--", lw=1, label="target d^β")
            n = sub["n"].dropna().iloc[0] if sub["n"].notna().any() else "?"
            ax.set_title(f"{c}: erank / d^β\n" + views[view].format(n=int(n) if n != "?" else n), fontsize=8)
        if axes[i][-1].get_legend():
            axes[i][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    return save_figure(fig, out_dir, name, show)


def _per_corruption_frame(df):
    import pandas as pd
    rows = []
    for _, r in df.iterrows():
        rob = r["result"].get("final", {}).get("robustness") or {}
        for corr, acc in (rob.get("per_corruption") or {}).items():
            rows.append({"config": r["config"], "seed": r["seed"], "corruption": corr, "acc": acc})
    return pd.DataFrame(rows)


def fig_per_corruption(df, out_dir, order=None, name="per_corruption", show=True):
    """Accuracy per corruption (mean over severities and seeds), one small panel per corruption (wrapped five
    to a row), so the figure stays readable for any number of configs."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    pc = _per_corruption_frame(df)
    if pc.empty:
        return None
    order = [c for c in (order or list(dict.fromkeys(pc["config"]))) if c in set(pc["config"])]
    corrs = list(dict.fromkeys(pc["corruption"]))
    ncol = min(5, len(corrs))
    nrow = -(-len(corrs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(min(MAX_FIG_INCHES, 2.9 * ncol), 2.4 * nrow + 0.8), squeeze=False,
                             sharey=True)
    palette = config_palette(order)
    top = max(1.0, float(pc.groupby(["corruption", "config"])["acc"].mean().max()))
    for ax, corr in zip(axes.flat, corrs):
        sub = pc[pc["corruption"] == corr]
        sns.barplot(data=sub, x="config", y="acc", hue="config", order=order, hue_order=order, palette=palette,
                    ax=ax, errorbar=None, legend=False)
        _label_bars(ax, "%.0f")
        ax.set_ylim(0, top * 1.15)  # accuracy from 0; an all-zero panel keeps a readable axis
        ax.set_title(corr.replace("_", " "), fontsize=9)
        ax.set_xticks([])
        ax.set_xlabel("")
        ax.set_ylabel("acc (%)", fontsize=8)
    for ax in list(axes.flat)[len(corrs):]:
        ax.axis("off")
    _palette_legend(fig, palette)
    fig.suptitle("accuracy per corruption (mean over severities), standard protocol", fontsize=10)
    return save_figure(fig, out_dir, name, show)


def fig_pareto(df, out_dir, name="pareto", show=True):
    """Accuracy and robustness against epoch time, the training loop alone as the paper's (Exp 10's
    overhead/benefit trade-off)."""
    import matplotlib.pyplot as plt
    agg = df.groupby("config", sort=False)[["acc_final", "rob", "train_s"]].mean()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, m, label in ((axes[0], "acc_final", "test accuracy, final epoch (%)"), (axes[1], "rob", "corruption accuracy (%)")):
        ax.scatter(agg["train_s"], agg[m])
        for c, row in agg.iterrows():
            ax.annotate(c, (row["train_s"], row[m]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("seconds per epoch (training loop)")
        ax.set_ylabel(label)
    return save_figure(fig, out_dir, name, show)


def fig_beta(df, out_dir, name="beta_schedules", show=True):
    """The beta each config used per epoch beside its test accuracy (Exp 16)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    hist = _history_frame(df)
    if hist.empty or "beta" not in hist.columns:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    palette = config_palette(hist["config"])  # the baseline has no β: the same colours in both panels all the same
    sns.lineplot(data=hist.dropna(subset=["beta"]), x="epoch", y="beta", hue="config", palette=palette, ax=axes[0],
                 errorbar=None, legend=False)
    sns.lineplot(data=hist, x="epoch", y="test_acc", hue="config", palette=palette, ax=axes[1], errorbar=None,
                 legend=False)
    axes[0].set_title("β schedule")
    axes[1].set_title("test accuracy")
    _palette_legend(fig, palette, line=True)
    fig.subplots_adjust(bottom=0.25)
    return save_figure(fig, out_dir, name, show)


def fig_dynamics(df, out_dir, name="dynamics", show=True):
    """Exp 1's four panels: accuracy, the training loss including the SES term (log), the SES term as it enters
    the loss (λ applied, log: the paper's ~0.5 -> ~0.003 scale), and the gap."""
    return fig_curves(df, out_dir, name, metrics=("test_acc", "train_loss_total", "ses_term", "gap"),
                      log=("train_loss_total", "ses_term"), show=show)


# ── Exp 28's figures: erank as the author measured it (erank_author: eval mode, the first 2048 test images) ──

def _erank_frame(df, view="erank_author"):
    """One row per (run, epoch, layer) of a per-epoch erank view: config, seed, model, epoch, layer, its position
    among the run's layers, erank, d, target d^β, ratio, samples."""
    import pandas as pd
    rows = []
    for _, r in df.iterrows():
        model = (r["result"].get("config") or {}).get("model", "?")
        for h in r["result"].get("history", []):
            for i, (layer, st) in enumerate((h.get(view) or {}).items()):
                rows.append({"config": r["config"], "seed": r["seed"], "model": model, "epoch": h["epoch"],
                             "layer": layer, "pos": i, "erank": st["erank"], "d": st["d"], "target": st["target"],
                             "ratio": st["ratio"], "samples": st.get("samples")})
    return pd.DataFrame(rows)


def _last_epoch(er):
    """The rows of each run's last epoch."""
    return er[er["epoch"] == er.groupby(["config", "seed"])["epoch"].transform("max")]


def _paper_layers(paper, config) -> list:
    """The paper's final-epoch layers of a config, in order ([] without the author's file: the typed copy has none)."""
    return list(((paper or {}).get(config) or {}).get("erank_layers", {}).values())


def fig_erank_dynamics(df, out_dir, name="erank_dynamics", show=True):
    """Exp 28's dynamics panels: each layer's effective rank over the epochs (mean over seeds), one panel per config,
    with its target d^β as a dashed line of the same colour; two configs to a row (baseline beside SES)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    er = _erank_frame(df)
    if er.empty:
        return None
    configs = list(dict.fromkeys(er["config"]))
    ncol = min(2, len(configs))
    nrow = -(-len(configs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(min(MAX_FIG_INCHES, 6 * ncol + 2), 3.3 * nrow), squeeze=False,
                             sharey="row")
    for k, (ax, c) in enumerate(zip(axes.flat, configs)):
        sub = er[er["config"] == c]
        layers = list(dict.fromkeys(sub.sort_values("pos")["layer"]))
        for colour, layer in zip(sns.color_palette("viridis", len(layers)), layers):
            curve = sub[sub["layer"] == layer].groupby("epoch")[["erank", "target", "d"]].mean()
            ax.plot(curve.index, curve["erank"], color=colour, lw=1.4, label=f"{layer} (d={int(curve['d'].iloc[0])})",
                    marker="o" if len(curve) < 5 else None)
            ax.axhline(curve["target"].iloc[-1], color=colour, ls="--", lw=0.8, alpha=0.7)
        ax.set_title(f"{c}: erank per layer (dashed: its target d^β)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("effective rank")
        if k % ncol == ncol - 1 or k == len(configs) - 1:  # one legend per row, right of it
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    n = er["samples"].dropna()
    fig.suptitle(f"as the author measured it: eval mode, {int(n.iloc[0]) if len(n) else '?'} test images",
                 fontsize=9)
    return save_figure(fig, out_dir, name, show)


def fig_erank_final(df, out_dir, paper=None, order=None, name="erank_final", show=True):
    """Exp 28's final-epoch bars: erank / d^β per layer (1 = on target), the configs of one model side by side (mean
    ± sd over seeds), one panel per model; the paper's ratios as black stars where its files were read."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    er = _erank_frame(df)
    if er.empty:
        return None
    fin = _last_epoch(er)
    models = list(dict.fromkeys(fin["model"]))
    palette = config_palette([c for c in (order or []) if c in set(fin["config"])] + list(fin["config"]))
    fig, axes = plt.subplots(len(models), 1, figsize=(min(MAX_FIG_INCHES, 11), 3.4 * len(models)), squeeze=False)
    for ax, m in zip(axes[:, 0], models):
        sub = fin[fin["model"] == m]
        configs, layers = list(dict.fromkeys(sub["config"])), list(dict.fromkeys(sub.sort_values("pos")["layer"]))
        sns.barplot(data=sub, x="layer", y="ratio", hue="config", order=layers, hue_order=configs, palette=palette,
                    errorbar="sd", ax=ax)
        for k, c in enumerate(configs):  # the hue's bar centres: seaborn dodges the configs over 0.8 of a slot
            ours = _paper_layers(paper, c)
            if len(ours) == len(layers):
                xs = [i - 0.4 + 0.8 * (k + 0.5) / len(configs) for i in range(len(layers))]
                ax.scatter(xs, [p["ratio"] for p in ours], marker="*", color="k", s=40, zorder=5,
                           label="paper" if k == 0 else None)
        ax.axhline(1.0, color="k", ls="--", lw=1, label="target (ratio 1)")
        means = ", ".join(f"{c} {sub[sub['config'] == c].groupby('seed')['ratio'].mean().mean():.2f}" for c in configs)
        ax.set_title(f"{m}: erank / d^β at the last epoch; mean over the layers: {means}", fontsize=9)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=40, labelsize=7)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, out_dir, name, show)


def fig_erank_spread(df, out_dir, paper=None, order=None, name="erank_spread", show=True):
    """Exp 28's spread across blocks: each layer's erank at the last epoch in depth order (mean over seeds), one line
    per config, the paper's dashed where its files were read, the targets d^β in black; max / min in the legend."""
    import matplotlib.pyplot as plt
    er = _erank_frame(df)
    if er.empty:
        return None
    fin = _last_epoch(er)
    models = list(dict.fromkeys(fin["model"]))
    palette = config_palette([c for c in (order or []) if c in set(fin["config"])] + list(fin["config"]))
    fig, axes = plt.subplots(1, len(models), figsize=(min(MAX_FIG_INCHES, 6 * len(models) + 1), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        sub = fin[fin["model"] == m]
        for c in dict.fromkeys(sub["config"]):
            line = sub[sub["config"] == c].groupby("pos")[["erank", "target"]].mean()
            ax.plot(line.index, line["erank"], "o-", color=palette[c], ms=3,
                    label=f"{c}: {line['erank'].max() / line['erank'].min():.1f}×")
            theirs = _paper_layers(paper, c)
            if len(theirs) == len(line):
                e = [p["erank"] for p in theirs]
                ax.plot(line.index, e, "x--", color=palette[c], ms=4, lw=1, label=f"paper: {max(e) / min(e):.1f}×")
        ax.plot(line.index, line["target"], "k:", lw=1.2, label="target d^β")
        layers = list(dict.fromkeys(sub.sort_values("pos")["layer"]))
        ax.set_xticks(range(len(layers)), layers, rotation=40, fontsize=7)
        ax.set_title(f"{m}: erank across the layers at the last epoch (spread max / min)", fontsize=9)
        ax.set_ylabel("effective rank")
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name, show)
