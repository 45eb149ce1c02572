"""The report's figure builders (used by the calibration report and notebooks/layer_similarity.ipynb)."""

import pytest
import torch

from minicache.calibrate import report
from minicache.calibrate.statistics import PairStatistics

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def stats():
    g = torch.Generator().manual_seed(0)
    s = PairStatistics(num_layers=4, num_heads=2, window=8)
    for pair in range(3):
        a = torch.randn(1, 2, 32, 16, generator=g)
        b = a + (pair + 1) * 0.5 * torch.randn(1, 2, 32, 16, generator=g)  # deeper pairs less similar
        for comp in (0, 1):
            s.add_pair(pair, comp, a, 1.5 * b)
    return s


@pytest.mark.parametrize(
    ("build", "axes"),
    [(report.similarity_figure, 3), (report.angle_histogram_figure, 4), (report.magnitude_ratio_figure, 3)],
)
def test_figures_build_without_pyplot(stats, build, axes):
    fig = build(stats)
    plotted = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(plotted) == axes
    assert all(ax.get_title() for ax in plotted)


def test_angle_histograms_of_chosen_pairs(stats):
    fig = report.angle_histogram_figure(stats, pairs=[1])
    labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert "pair 1-2" in labels and "pair 0-1" not in labels


def test_plot_similarity_writes_png(stats, tmp_path):
    path = tmp_path / "similarity.png"
    report.plot_similarity(stats, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
