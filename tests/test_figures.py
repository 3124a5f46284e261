"""Figures that tell the truth: each figure kind renders from results with missing or constant series, a config keeps
its colour in a panel where another config has no values, an all-zero bar is drawn with its value, and an accuracy
axis that does not start at 0 says so. Synthetic result dicts (unit test: no training)."""
import matplotlib.colors as mcolors
import pandas as pd
import pytest

import seslib as S


def _result(config, seed, acc, ses, rob=None, epochs=3):
    history = [dict(epoch=e + 1, test_acc=acc - 3 + e, train_loss=1.0 / (e + 1), gap=2.0, lr=0.1,
                    **(dict(ses_term=0.5 / (e + 1), train_loss_total=1.2 / (e + 1), beta=0.7) if ses else {}))
               for e in range(epochs)]
    per = {c: rob for c in ("gaussian_noise", "contrast")} if rob is not None else None
    final = dict(test_acc=acc, best_test_acc_over_epochs=acc + 0.2, gap=2.0, epoch_seconds_mean=30.0 + 10 * ses,
                 robustness=dict(mean_corruption_acc=rob, per_corruption=per) if rob is not None else None)
    return dict(config=dict(seed=seed), history=history, final=final, env=dict(device_name="cpu"))


def _frame(rows):
    return pd.DataFrame([S.results._result_row(c, _result(c, s, acc, ses, rob), f"runs/{c}_seed{s}")
                         for c, s, acc, ses, rob in rows])


@pytest.fixture
def drawn(patch_seslib):
    """Every figure a call makes, kept open instead of saved."""
    figs = []

    def keep(fig, out_dir, name, show=True):
        figs.append(fig)
        return f"{out_dir}/figures/{name}.png"
    patch_seslib("save_figure", keep)
    return figs


def _line_colours(ax):
    return [mcolors.to_hex(line.get_color()) for line in ax.get_lines() if len(line.get_xdata())]


def test_a_config_keeps_its_colour_where_the_baseline_has_no_values(drawn, tmp_path):
    """Exp 1's dynamics: the SES term exists for the SES run only; it used to take the baseline's colour there, and
    the legend then called the SES curve 'baseline'."""
    df = _frame([("baseline", 42, 91.0, False, None), ("ses", 42, 92.0, True, None)])
    S.fig_dynamics(df, tmp_path)
    fig = drawn[-1]
    acc, total, term = fig.axes[0], fig.axes[1], fig.axes[2]
    base_colour, ses_colour = _line_colours(acc)
    assert base_colour != ses_colour
    assert _line_colours(term) == [ses_colour] and _line_colours(total) == [ses_colour]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["baseline", "ses"]
    assert [mcolors.to_hex(h.get_color()) for h in legend.legend_handles] == [base_colour, ses_colour]


def test_all_zero_bars_are_drawn_with_their_value_on_an_axis_from_zero(drawn, tmp_path):
    df = _frame([("baseline", 42, 0.5, False, 0.0), ("ses", 42, 0.5, True, 0.0)])
    S.fig_per_corruption(df, tmp_path)
    for ax in drawn[-1].axes[:2]:
        lo, hi = ax.get_ylim()
        assert lo == 0 and hi >= 1  # not ±0.04 around nothing
        assert [t.get_text() for t in ax.texts] == ["0", "0"]
        zero_marks = [line for line in ax.get_lines() if list(line.get_ydata()) == [0, 0]]
        assert len(zero_marks) == 2 and all(line.get_linewidth() >= 3 for line in zero_marks)  # drawn, not absent


def test_an_accuracy_axis_that_does_not_start_at_zero_says_so(drawn, tmp_path):
    df = _frame([("baseline", 42, 91.0, False, 70.0), ("ses", 42, 92.5, True, 72.0)])
    S.fig_bars(df, tmp_path, paper={"ses": {"acc": 92.6}})
    acc, gap, rob = drawn[-1].axes[:3]
    for ax in (acc, rob):
        bottom = ax.get_ylim()[0]
        assert bottom > 0 and f"axis from {bottom:.0f}, not 0" in ax.get_title()
    assert "axis from" not in gap.get_title()
    assert any(t.get_text() == "92.5" for t in acc.texts)  # values written on the bars


@pytest.mark.parametrize("kind", sorted(set(S.FIGURES) - {"toy"}))
def test_every_figure_kind_renders_with_missing_and_constant_series(drawn, tmp_path, kind):
    df = _frame([("baseline", 42, 90.0, False, None),   # no robustness, no SES series
                 ("ses", 42, 90.0, True, 0.0),          # constant accuracy, zero robustness
                 ("ses", 43, 90.0, True, 0.0)])
    S.FIGURES[kind](df, tmp_path)  # no exception; None only where the kind has nothing to draw
    for fig in drawn:
        assert fig.axes


# ── figures that cannot pass for what they are not (issue 32) ──

def test_a_series_has_one_colour_in_every_panel_of_the_bars(drawn, tmp_path):
    """'paper' was the second colour in the gap panel and the third in the accuracy panel (where the second was 'ours:
    best epoch'): a role now keeps its colour across panels."""
    df = _frame([("baseline", 42, 91.0, False, 70.0), ("ses", 42, 92.5, True, 72.0)])
    S.fig_bars(df, tmp_path, paper={"ses": {"acc": 92.6, "gap": 2.1, "rob": 71.0}})
    colours = {}
    for ax in drawn[-1].axes[:3]:
        legend = ax.get_legend()
        for text, handle in zip(legend.get_texts(), legend.legend_handles):
            colours.setdefault(text.get_text(), set()).add(mcolors.to_hex(handle.get_facecolor()))
    assert all(len(c) == 1 for c in colours.values()), colours
    assert colours["ours: final epoch"] == colours["ours: standard 15×5"] != colours["paper"]


def test_a_saved_figure_names_its_preset_and_shows_whole_epochs(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([1], [50.0], marker="o")  # a 1-epoch run: matplotlib's own axis reads 0.96 ... 1.04
    ax.set_xlabel("epoch")
    token = S.util.FIGURE_NOTE.set("05_multiseed_cifar10 · preset smoke: not the paper")
    try:
        S.save_figure(fig, tmp_path, "one_epoch", show=False)
    finally:
        S.util.FIGURE_NOTE.reset(token)
    assert [t.get_text() for t in fig.texts] == ["05_multiseed_cifar10 · preset smoke: not the paper"]
    assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_xticks()
    assert (tmp_path / "figures" / "one_epoch.png").is_file()


def test_the_figure_note_says_preset_and_synthetic():
    import types
    plan = types.SimpleNamespace(name="22_bert_glue", out_dir="x", preset="smoke",
                                 resolved={("sst2_baseline", 42): {"text_data": "synthetic"}})
    note = S.figure_note(plan)
    assert "preset smoke" in note and "say nothing about the paper" in note and "SYNTHETIC data" in note
    paper = types.SimpleNamespace(name="05_multiseed_cifar10", out_dir="x", preset="paper", resolved={})
    assert S.figure_note(paper) == "05_multiseed_cifar10 · preset paper"
