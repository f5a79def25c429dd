"""Plots a reader can read: confusion counts and colour bar, explained diagnostics, enough points in short runs."""

from __future__ import annotations

import matplotlib.pyplot as plt

from kt_train.evaluate import confusion_figure
from kt_train.loop import log_interval
from kt_train.metrics import diagnostics_figure


def test_confusion_matrix_shows_counts_and_a_colour_bar():
    fig = confusion_figure([[5, 1, 0], [0, 3, 2], [0, 0, 4]], ["ant", "bee", "cat"])
    image_axes, bar = fig.axes
    texts = sorted(t.get_text() for t in image_axes.texts)
    assert texts == sorted(["5", "1", "3", "2", "4"])                 # zero cells stay empty
    assert "fraction" in bar.get_ylabel() and "15 images" in image_axes.get_title()
    plt.close(fig)


def test_diagnostics_put_fractions_and_norms_on_separate_explained_axes():
    series = {"tie_frac": ([1, 2], [0.1, 0.2]), "vote_agreement": ([1, 2], [0.6, 0.7]),
              "x_norm": ([1, 2], [8.0, 9.0]), "x_hat_norm": ([1, 2], [7.0, 7.5])}
    fig = diagnostics_figure(series)
    fractions, norms = fig.axes
    legend = [t.get_text() for t in fractions.get_legend().get_texts()]
    assert any(t.startswith("tie_frac: uniform: fraction of feature dims") for t in legend)
    assert fractions.get_ylim() == (0, 1.02) and "norms" in norms.get_title()
    assert {t.get_text().split(":")[0] for t in norms.get_legend().get_texts()} == {"x_norm", "x_hat_norm"}
    plt.close(fig)


def test_short_runs_log_often_enough_for_a_curve():
    assert log_interval(10, 30) == 1 and log_interval(10, 500) == 5
    assert log_interval(10, 100_000) == 10 and log_interval(1, 3) == 1


def test_a_confusion_matrix_of_many_classes_draws_the_classes_that_occur():
    counts = [[0] * 1000 for _ in range(1000)]
    counts[285][285], counts[285][504], counts[504][504] = 4, 1, 3
    fig = confusion_figure(counts, [f"class {i}" for i in range(1000)])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["class 285", "class 504"]
    assert sorted(t.get_text() for t in ax.texts) == ["1", "3", "4"]
    plt.close(fig)
