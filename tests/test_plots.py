"""The run's figures say what they show: run, tasks and splits, chance, epoch ends, what memory was measured where
against the plan, and one colour per refiner. Synthetic metrics records of the shape train.py writes."""
import json
from types import SimpleNamespace

import matplotlib
import pytest
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import to_hex

from lowmem_graph import plots

MiB = 2 ** 20
REFINERS = ["phi3", "mistral"]
READERS = ["llama", "qwen2", "gemma2"]
STEPS_PER_EPOCH = 4


def step_record(step, epoch, cuda=False):
    record = {"kind": "step", "step": step, "epoch": epoch, "loss": 1.4 - 0.02 * step, "acc": 0.25 + 0.01 * step,
              "grad_norm": 1.0,
              "grad_norms": {**{f"read_proj.{r}": 0.1 * (i + 1) for i, r in enumerate(READERS)},
                             **{f"readout.{j}": 0.5 + i for i, j in enumerate(REFINERS)}, "output": 2.0},
              "reader_grad_share": 0.12, "routing": {"phi3": 0.6, "mistral": 0.4}, "lr": 1e-3,
              "host_rss_mb": 900.0 + step}
    if cuda:
        record.update(cuda_allocated_mb=1000.0, cuda_peak_allocated_mb=2500.0 + step, cuda_peak_reserved_mb=2800.0)
    return record


def epoch_record(epoch, cuda=False):
    record = {"kind": "epoch", "epoch": epoch, "step": epoch * STEPS_PER_EPOCH, "train_loss": 1.3, "train_acc": 0.3,
              "eval_loss": 1.25, "eval_acc": 0.4, "eval_ci": [0.3, 0.5], "eval_n": 4,
              "routing": {"phi3": 0.55, "mistral": 0.45}, "seconds": 1.0, "host_rss_mb": 950.0}
    if cuda:
        record.update(cuda_allocated_mb=1000.0, cuda_peak_allocated_mb=2900.0, cuda_peak_reserved_mb=3000.0)
    return record


def make_run(tmp_path, name="run-arc", epochs=3, cuda=False, evaluated=None, config=True, gpu_mem=None,
             choices=(4, 4, 3, 5)):
    """A run folder as train.py leaves it: config.yaml, metrics.jsonl, the last evaluation's predictions."""
    run = tmp_path / name
    run.mkdir()
    if config:
        train = {"task": "arc-easy", "eval_task": None, "train_split": "train", "eval_split": "validation",
                 "epochs": epochs, "device": "auto", "gpu_mem": gpu_mem}
        (run / "config.yaml").write_text(yaml.safe_dump({"graph": {"name": "tiny"}, "train": train}, sort_keys=False))
    records = []
    for epoch in range(1, epochs + 1):
        records += [step_record((epoch - 1) * STEPS_PER_EPOCH + i, epoch, cuda) for i in range(1, STEPS_PER_EPOCH + 1)]
        if evaluated is None or epoch in evaluated:
            records.append(epoch_record(epoch, cuda))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if choices:
        rows = [{"id": f"q{i}", "label": 0, "prediction": 0, "correct": True, "probs": [1 / n] * n}
                for i, n in enumerate(choices)]
        (run / "predictions-arc-easy-validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run / "metrics.jsonl"


def by_gid(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


@pytest.fixture(autouse=True)
def no_figures_left():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "a figure was left open"


def test_plot_functions_write_pngs_and_close_their_figures(tmp_path):
    metrics = make_run(tmp_path, cuda=True)
    for plot, name in [(plots.plot_curves, "curves.png"), (plots.plot_memory, "memory.png"),
                       (plots.plot_signals, "signals.png")]:
        path = plot(metrics, tmp_path / name)
        assert path == tmp_path / name and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = SimpleNamespace(peak=3 * 1024 * MiB, budget=4 * 1024 * MiB)
    assert plots.plot_memory(metrics, tmp_path / "m.png", device="cuda:0 (NVIDIA Test)", plan=plan).stat().st_size
    assert plots.plot_curves(metrics, tmp_path / "c.png", chance=0.2).stat().st_size


def test_curves_title_names_run_tasks_and_splits(tmp_path):
    fig = plots.curves_figure(make_run(tmp_path, name="arc-run-7"))
    title = fig._suptitle.get_text().replace("\n", " ")
    plt.close(fig)
    assert "arc-run-7" in title and "arc-easy:train" in title and "arc-easy:validation" in title


def test_curves_title_with_explicit_splits_and_several_tasks(tmp_path):
    metrics = make_run(tmp_path)
    config = yaml.safe_load((metrics.parent / "config.yaml").read_text())
    config["train"].update(task="arc-challenge:train+openbookqa+mmlu@500+hf:org/qa", eval_task=None, eval_split="test")
    (metrics.parent / "config.yaml").write_text(yaml.safe_dump(config))
    fig = plots.curves_figure(metrics)
    title = " ".join(fig._suptitle.get_text().split())
    plt.close(fig)
    assert "trained on arc-challenge:train + openbookqa:train + mmlu:train@500 + hf:org/qa:train" in title
    assert "evaluated on arc-challenge:test + openbookqa:test + mmlu:test + hf:org/qa:test" in title


def test_curves_title_without_config_says_so(tmp_path):
    fig = plots.curves_figure(make_run(tmp_path, name="bare", config=False))
    title = fig._suptitle.get_text()
    plt.close(fig)
    assert title.startswith("bare") and "unknown" in title


def test_chance_line_from_the_questions_choices(tmp_path):
    fig = plots.curves_figure(make_run(tmp_path, choices=(4, 4, 3, 5)))
    ax_loss, ax_acc = fig.axes
    (line,) = by_gid(ax_acc, "chance")
    expected = (1 / 4 + 1 / 4 + 1 / 3 + 1 / 5) / 4
    assert list(line.get_ydata()) == pytest.approx([expected, expected])
    assert line.get_linestyle() == "--" and "4 validation questions" in line.get_label()
    assert not by_gid(ax_loss, "chance")
    plt.close(fig)


def test_chance_line_assumes_four_choices_without_predictions_and_takes_a_given_value(tmp_path):
    metrics = make_run(tmp_path, choices=())
    fig = plots.curves_figure(metrics)
    (line,) = by_gid(fig.axes[1], "chance")
    assert list(line.get_ydata()) == pytest.approx([0.25, 0.25]) and "assumed 4 choices" in line.get_label()
    plt.close(fig)
    fig = plots.curves_figure(metrics, chance=0.2)
    (line,) = by_gid(fig.axes[1], "chance")
    assert list(line.get_ydata()) == pytest.approx([0.2, 0.2])
    plt.close(fig)


def test_epoch_marks_at_each_epochs_last_step(tmp_path):
    fig = plots.curves_figure(make_run(tmp_path, epochs=3))
    for ax in fig.axes:
        marks = by_gid(ax, "epoch-end")
        assert [line.get_xdata()[0] for line in marks] == [4, 8, 12]
    plt.close(fig)


def test_epoch_ends_of_an_interrupted_run():
    """Epoch 2 ended (epoch 3's steps follow) but was never evaluated; epoch 3 is still under way."""
    steps = [step_record(s, (s - 1) // STEPS_PER_EPOCH + 1) for s in range(1, 11)]
    assert plots.epoch_ends(steps, [epoch_record(1)]) == [4, 8]
    assert plots.epoch_ends([], []) == []


def test_memory_on_cpu_starts_at_zero_and_says_what_it_measured(tmp_path):
    fig = plots.memory_figure(make_run(tmp_path))
    (ax,) = fig.axes
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 912
    title = ax.get_title().replace("\n", " ")
    assert "on cpu" in title and "host RSS" in title and "psutil" in title
    assert [line.get_gid() for line in ax.get_lines() if line.get_gid() != "epoch-end"] == ["host_rss_mb"]
    assert not by_gid(ax, "budget") and not by_gid(ax, "predicted-peak")
    assert len(by_gid(ax, "epoch-end")) == 3
    plt.close(fig)


def test_memory_under_a_plan_draws_predicted_peak_and_budget(tmp_path):
    metrics = make_run(tmp_path, cuda=True, gpu_mem="4G")
    plan = SimpleNamespace(peak=3 * 1024 * MiB, budget=4 * 1024 * MiB, eval_peak=3.5 * 1024 * MiB)
    fig = plots.memory_figure(metrics, device="cuda:0 (NVIDIA Test GPU)", plan=plan)
    (ax,) = fig.axes
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 4096
    title = ax.get_title().replace("\n", " ")
    assert "cuda:0 (NVIDIA Test GPU)" in title and "torch.cuda" in title and "cuda:0" in ax.get_ylabel()
    (peak,) = by_gid(ax, "predicted-peak")
    (budget,) = by_gid(ax, "budget")
    (eval_peak,) = by_gid(ax, "predicted-eval-peak")
    assert list(peak.get_ydata()) == pytest.approx([3072, 3072]) and "predicted" in peak.get_label()
    assert list(budget.get_ydata()) == pytest.approx([4096, 4096]) and "--gpu-mem 4G" in budget.get_label()
    assert list(eval_peak.get_ydata()) == pytest.approx([3584, 3584])
    assert {"cuda_allocated_mb", "cuda_peak_allocated_mb", "cuda_peak_reserved_mb", "host_rss_mb"} <= {
        line.get_gid() for line in ax.get_lines()}
    labels = ax.get_legend_handles_labels()[1]
    assert peak.get_label() in labels and budget.get_label() in labels
    plt.close(fig)


def test_memory_budget_from_the_config_when_no_plan_is_given(tmp_path):
    fig = plots.memory_figure(make_run(tmp_path, cuda=True, gpu_mem="6G"))
    (ax,) = fig.axes
    (budget,) = by_gid(ax, "budget")
    assert list(budget.get_ydata()) == pytest.approx([6144, 6144])
    assert not by_gid(ax, "predicted-peak") and "not given" in ax.get_title().replace("\n", " ")
    assert "on cuda" in ax.get_title() and ax.get_ylim() == pytest.approx((0, 6144 * 1.08))
    plt.close(fig)


def test_one_colour_per_refiner_in_every_panel(tmp_path):
    fig = plots.signals_figure(make_run(tmp_path))
    ax_norms, _, ax_route = fig.axes
    colour = {}
    for ax in (ax_norms, ax_route):
        for line in ax.get_lines():
            label = line.get_label()
            for j in REFINERS:
                if label in (f"readout.{j}", f"{j} (train)", f"{j} (eval)"):
                    colour.setdefault(j, set()).add(to_hex(line.get_color()))
    assert set(colour) == set(REFINERS)
    assert all(len(c) == 1 for c in colour.values()), colour          # the same in every panel
    assert len({next(iter(c)) for c in colour.values()}) == len(REFINERS)   # and different refiners differ
    legend = [t.get_text() for t in ax_route.get_legend().get_texts()]
    assert legend == ["phi3 (train)", "phi3 (eval)", "mistral (train)", "mistral (eval)"]
    reader_colours = {to_hex(line.get_color()) for line in ax_norms.get_lines() if line.get_label().startswith("read_")}
    assert len(reader_colours) == len(READERS) and not reader_colours & {next(iter(c)) for c in colour.values()}
    assert len(by_gid(ax_route, "epoch-end")) == 3
    plt.close(fig)


def test_node_colours_are_fixed_by_order():
    a = plots.node_colours(["phi3", "mistral"], ["llama"])
    assert a == plots.node_colours(["phi3", "mistral"], ["llama", "phi3"])
    assert len(set(a.values())) == 3


@pytest.mark.parametrize("graph", ["paper-separate", "coupled"])
def test_every_trained_part_is_drawn_in_its_nodes_colour(graph):
    """The signals figure colours each part's gradient norm by its node: an edge's map by its source (a carry by
    its target), a readout by its node; every part a graph trains maps to one of its nodes."""
    import contextlib
    from dataclasses import replace
    from pathlib import Path

    import torch

    from lowmem_graph.edge_graph import EdgeGraph
    from lowmem_graph.plots import _node_of
    from lowmem_graph.spec import load_preset, load_spec
    from lowmem_graph.summary import node_shapes

    spec = (replace(load_preset("paper"), carry="separate") if graph == "paper-separate"
            else load_spec(Path(__file__).resolve().parents[1] / "examples" / "residual_coupling.yaml"))
    objective = spec.train.get("objective", "choice")
    with torch.device("meta") if graph.startswith("paper") else contextlib.nullcontext():   # the tiny ones: real
        built = EdgeGraph(spec, node_shapes(spec), objective)
    parts = {f"{kind}.{key}": key for kind in ("project", "carry", "bridge", "gate", "readout")
             for key in getattr(built, kind)}
    assert parts
    expected = {}
    for site in built.sites:
        e = site.edge
        for kind in ("project", "bridge", "gate"):
            expected[f"{kind}.{site.key}"] = e.source
        expected[f"carry.{site.key}"] = e.target
    expected.update({f"readout.{j}": j for j in built.readout})
    assert {p: _node_of(p) for p in parts} == {p: expected[p] for p in parts}
    assert {_node_of(p) for p in parts} <= set(built.nodes)


@pytest.fixture
def kept(monkeypatch):
    """The figures a plot function draws, kept open for the test to measure, closed after it."""
    close, figures = plt.close, []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    for fig in figures:
        close(fig)


def test_alignment_panels_do_not_overlap_and_keep_their_labels(tmp_path, kept):
    nodes = ["llama", "qwen2", "gemma2", "phi3", "mistral"]
    rows = [{"from": a, "to": b, "r2": 0.5, "r2_permuted": -0.1, "r2_other_task": 0.3}
            for a in nodes for b in nodes if a != b]
    plots.plot_alignment(rows, tmp_path / "alignment.png", "tiny: arc-easy train, 120 questions")
    (fig,) = kept
    renderer = fig.canvas.get_renderer()
    first, *others = fig.axes[:3]
    for left, right in zip(fig.axes[:2], fig.axes[1:3]):      # nothing of a panel runs into the next one
        assert left.get_tightbbox(renderer).x1 <= right.get_window_extent(renderer).x0
    assert all(not [t for t in ax.get_yticklabels() if t.get_text()] for ax in others)
    page = fig.bbox
    for ax in fig.axes[:3]:
        box = ax.xaxis.label.get_window_extent(renderer)       # "to", inside the picture
        assert box.y0 >= page.y0 and box.x1 <= page.x1


def test_lm_curves_tell_the_nodes_apart_after_one_epoch(tmp_path, kept):
    from lowmem_graph.lm import plot_lm_curves

    records = [{"variant": "coupled", "kind": "step", "step": 1, "loss": 6.0},
               {"variant": "coupled", "kind": "epoch", "epoch": 1, "step": 1,
                "perplexity": {"llama": 400.0, "mistral": 420.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_lm_curves(tmp_path / "metrics.jsonl", tmp_path / "lm-curves.png", "coupled")
    (fig,) = kept
    lines = fig.axes[1].get_lines()
    assert len(lines) == 2 and lines[0].get_marker() != lines[1].get_marker()


@pytest.mark.parametrize("graph", ["tiny", "residual_coupling.yaml"])
def test_drawn_arrows_reach_their_boxes_and_labels_stay_off_them(graph, tmp_path, kept):
    from pathlib import Path

    from lowmem_graph.drawing import draw
    from lowmem_graph.spec import load_preset, load_spec
    from lowmem_graph.topology import of_spec

    examples = Path(__file__).resolve().parents[1] / "examples"
    spec = load_spec(examples / graph) if graph.endswith(".yaml") else load_preset(graph)
    draw(of_spec(spec), tmp_path / "graph.png")
    (fig,) = kept
    ax = fig.axes[0]
    fig.canvas.draw()           # the arrows are clipped at the boxes when drawn
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_bbox_patch().get_window_extent(renderer) for t in ax.texts if t.get_bbox_patch() is not None
             and t.get_bbox_patch().get_edgecolor()[3] > 0]
    labels = [t.get_window_extent(renderer) for t in ax.texts if t.get_text() and t.get_bbox_patch() is not None
              and t.get_bbox_patch().get_edgecolor()[3] == 0]
    arrows = [a.arrow_patch for a in ax.texts if getattr(a, "arrow_patch", None) is not None]
    assert arrows and labels
    for arrow in arrows:
        drawn = arrow.get_path()       # in display coordinates (pixels), the head included
        keep = drawn.codes != drawn.CLOSEPOLY      # (whose vertex is a placeholder)
        path = type(drawn)(drawn.vertices[keep], drawn.codes[keep])
        start = path.vertices[0]
        tip = max(path.vertices, key=lambda v: (v[0] - start[0]) ** 2 + (v[1] - start[1]) ** 2)
        for point in (start, tip):     # each end within 6 pixels of a box's edge
            assert min(max(b.x0 - point[0], point[0] - b.x1, b.y0 - point[1], point[1] - b.y1, 0) for b in boxes) < 6
        for label in labels:
            assert not path.intersects_bbox(label, filled=False), label
