"""`poet-mlx report`: the HTML/SVG picture (valid SVG, labelled axes, one path per series, legends), the
terminal charts, --compare, and the errors a user can hit."""

from __future__ import annotations

import json
import math
import re
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import run_config

from poet_mlx.cli.charts import Chart, Series, nice_range, nice_ticks, plot_series, tick_label
from poet_mlx.cli.main import main
from poet_mlx.cli.report import label_runs, load_run, run_label
from poet_mlx.cli.svg import chart_svg, combined_svg

SVG = "{http://www.w3.org/2000/svg}"


def write_run(folder, loss="dpo", poet=True, steps=(10, 20, 30), scale=1.0, **settings):
    """A run folder as the trainer leaves it: adapter_config.json with the settings, metrics.jsonl."""
    folder.mkdir(parents=True)
    config = {"model": "mlx-community/tiny-4bit", "loss": loss, "beta": None, "poet": poet, "poet_ratio": 1.0,
              "fine_tune_type": "lora", "rank": 8, **settings}
    (folder / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora",
                                                            "poet_mlx": {"version": "0", "config": config}}))
    records = [{"step": 0, "eval_loss": 0.693, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.0}]
    for s in steps:
        records.append({"step": s, "loss": scale * 0.7 * math.exp(-s / 20), "rewards/margins": s / 10,
                        "rewards/accuracies": min(1.0, 0.5 + s / 60), "grad_norm": 1.0 / s, "learning_rate": 1e-4})
        records.append({"step": s, "eval_loss": scale * 0.6 * math.exp(-s / 25), "eval_rewards/margins": s / 12,
                        "eval_rewards/accuracies": min(1.0, 0.5 + s / 70)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def svgs_of(html: str) -> list[ET.Element]:
    """Every <svg> element of the page, parsed as XML (raises if one is not well-formed)."""
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", html, re.S)]


def texts(svg: ET.Element) -> list[str]:
    return [t.text for t in svg.iter(f"{SVG}text")]


def series_paths(svg: ET.Element) -> list[ET.Element]:
    return [p for p in svg.iter(f"{SVG}path") if p.get("class") == "series"]


def chart_titled(svgs, title: str) -> ET.Element:
    return next(s for s in svgs if s.get("aria-label") == title)


def test_report_html_has_labelled_charts_with_one_path_per_series(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    out = tmp_path / "page.html"
    assert main(["report", str(run), "--output", str(out), "--plain"]) == 0
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", "")  # self-contained: nothing to fetch, nothing to run
    svgs = svgs_of(html)
    assert len(svgs) == 5
    loss = chart_titled(svgs, "Loss")
    words = texts(loss)
    assert "step" in words and "loss" in words and "Loss" in words  # x label, y label, title
    paths = series_paths(loss)
    assert [p.get("data-label") for p in paths] == ["dpo+poet train", "dpo+poet validation"]
    assert len(re.findall(r"[ML]", paths[0].get("d"))) == 3  # 3 training reports
    assert len(re.findall(r"[ML]", paths[1].get("d"))) == 4  # validation at steps 0, 10, 20, 30
    assert paths[1].get("stroke-dasharray")
    legend = next(g for g in loss.iter(f"{SVG}g") if g.get("class") == "legend")
    assert [t.text for t in legend.iter(f"{SVG}text")] == ["dpo+poet train", "dpo+poet validation"]
    acc = chart_titled(svgs, "Reward accuracy (chosen reward > rejected)")
    assert "rewards/accuracies" in texts(acc) and "1.0" in texts(acc) and "0" in texts(acc)
    margin = chart_titled(svgs, "Reward margin (chosen - rejected)")
    assert "rewards/margins" in texts(margin)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"report path={out}"
    assert lines[0].startswith("run label=dpo+poet ")


def test_compare_overlays_runs_with_a_legend(tmp_path):
    a = write_run(tmp_path / "dpo", poet=False)
    b = write_run(tmp_path / "dpo-poet", poet=True, scale=0.5)
    c = write_run(tmp_path / "simpo", loss="simpo", poet=False, steps=(10, 20))
    out = tmp_path / "cmp.html"
    assert main(["report", str(a), "--compare", str(b), str(c), "--output", str(out), "--quiet"]) == 0
    svgs = svgs_of(out.read_text())
    loss = chart_titled(svgs, "Loss")
    labels = [p.get("data-label") for p in series_paths(loss)]
    assert labels == ["dpo train", "dpo validation", "dpo+poet train", "dpo+poet validation", "simpo train",
                      "simpo validation"]
    colors = [p.get("stroke") for p in series_paths(loss)]
    assert colors[0] == colors[1] and len({colors[0], colors[2], colors[4]}) == 3  # one color per run
    legend = next(g for g in loss.iter(f"{SVG}g") if g.get("class") == "legend")
    assert [t.text for t in legend.iter(f"{SVG}text")] == labels
    page = out.read_text()
    assert "dpo+poet" in page.split("<h2>Runs</h2>", 1)[1].split("</table>", 1)[0]
    assert "pairs cut to equal length" in page  # POET and non-POET metrics measure different things


def test_default_output_is_in_the_run_folder_and_terminal_charts_are_drawn(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert (run / "report.html").is_file() and str(run / "report.html") in out
    for title in ("Loss", "Reward margin (chosen - rejected)", "Reward accuracy (chosen reward > rejected)"):
        assert title in out
    assert "dpo+poet train" in out and "(x: step, y: loss)" in out
    assert re.search(r"[\u2801-\u28ff]", out), "no braille plot drawn"
    assert "final eval_loss" in out and "dpo, beta 0.1" in out


def test_svg_output_is_one_valid_svg_file(tmp_path):
    run = write_run(tmp_path / "run")
    out = tmp_path / "r.svg"
    assert main(["report", str(run), "--output", str(out), "--quiet"]) == 0
    root = ET.parse(out).getroot()
    assert root.tag == f"{SVG}svg"
    assert len([s for s in root if s.tag == f"{SVG}svg"]) == 5


def test_png_without_cairosvg_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # import cairosvg now raises ImportError
    run = write_run(tmp_path / "run")
    assert main(["report", str(run), "--output", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pip install 'poet-mlx[png]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("case", ["missing", "not_a_run", "bad_suffix"])
def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, case):
    run = write_run(tmp_path / "run")
    argv = {"missing": [str(tmp_path / "nope")], "not_a_run": [str(tmp_path)],
            "bad_suffix": [str(run), "--output", str(tmp_path / "r.pdf")]}[case]
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_warnings_of_the_run_are_shown(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "warning": "loss has not moved for 50 steps", "kind": "flat_loss"}) + "\n")
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--output", str(out)]) == 0
    assert "dpo+poet, step 30: loss has not moved for 50 steps" in out.read_text()
    assert "loss has not moved for 50 steps" in capsys.readouterr().out
    loss = chart_titled(svgs_of(out.read_text()), "Loss")
    assert len(re.findall("[ML]", series_paths(loss)[0].get("d"))) == 3  # the warning is not a data point


def test_a_half_written_last_line_is_skipped(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "loss": 0.0')  # a run still writing, or killed mid-line
    assert load_run(run).skipped_lines == 1
    assert main(["report", str(run), "--no-charts"]) == 0
    assert "skipped 1 unreadable line" in capsys.readouterr().out


def test_prefix_curves_from_json(tmp_path):
    run = write_run(tmp_path / "run")
    curve = tmp_path / "prefix.json"
    curve.write_text(json.dumps([{"k": [1, 2, 4, 8, "full"], "accuracy": [0.55, 0.6, 0.7, 0.8, 0.9], "label": "dpo"},
                                 {"k": [1, 2, 4, 8, "full"], "accuracy": [0.6, 0.7, 0.8, 0.85, 0.9],
                                  "label": "dpo+poet"}]))
    out = tmp_path / "p.html"
    assert main(["report", str(run), "--prefix-curve", str(curve), "--output", str(out), "--quiet"]) == 0
    svg = chart_titled(svgs_of(out.read_text()), "Reward accuracy of the first k response tokens")
    assert "full" in texts(svg) and "prefix length k (tokens)" in texts(svg)
    assert [p.get("data-label") for p in series_paths(svg)] == ["dpo", "dpo+poet"]
    curve.write_text('{"k": [1, 2]}')
    assert main(["report", str(run), "--prefix-curve", str(curve), "--quiet"]) == 2


def test_prefix_curve_in_the_format_of_poet_mlx_eval(tmp_path):
    from poet_mlx.cli.report import load_prefix_curves, prefix_chart

    prefix = pytest.importorskip("poet_mlx.analysis.prefix")
    curve = prefix.PrefixCurve(k=[1, 2, 4], accuracy=[0.5, None, 0.75], margin=[0.1, None, 0.3], pairs=[8, 0, 4],
                               full={"accuracy": 0.9, "margin": 1.0, "pairs": 8}, label="dpo+poet")
    path = tmp_path / "curve.json"
    path.write_text(json.dumps(curve.to_json()))
    (c,) = load_prefix_curves(path)
    assert c["k"] == [1, 2, 4, "full"] and c["accuracy"] == [0.5, None, 0.75, 0.9] and c["label"] == "dpo+poet"
    svg = ET.fromstring(chart_svg(prefix_chart([c])))
    (p,) = series_paths(svg)
    assert p.get("d").count("M") == 2  # the unreached k = 2 leaves a gap
    assert "full" in texts(svg)


@pytest.mark.slow
def test_report_of_a_real_run(tiny_model_dir, tiny_data_dir, tmp_path):
    from poet_mlx.train.run import run_training

    cfg = run_config(tiny_model_dir, tiny_data_dir, tmp_path / "run", iters=2, steps_per_eval=1, poet=True)
    run_training(cfg)
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "run"), "--output", str(out), "--quiet"]) == 0
    loss = chart_titled(svgs_of(out.read_text()), "Loss")
    d = [p.get("d") for p in series_paths(loss)]
    assert len(d) == 2 and len(re.findall("L", d[0])) == 1 and len(re.findall("L", d[1])) == 2


# -- the pieces -----------------------------------------------------------------------------------------


def test_labels_come_from_the_settings_and_are_made_unique(tmp_path):
    assert run_label({"loss": "simpo", "poet": True, "poet_ratio": 0.5}) == "simpo+poet(r=0.5)"
    assert run_label({"loss": "dpo", "poet": False}) == "dpo" and run_label({}) == "run"
    runs = label_runs([load_run(write_run(tmp_path / n)) for n in ("a", "b")])
    assert [r.label for r in runs] == ["dpo+poet (a)", "dpo+poet (b)"]


def test_chart_svg_escapes_text_and_breaks_lines_at_gaps():
    chart = Chart("a <b> & c", "x \"q\"", "y", [Series("s<1>", [1, 2, 3, 4], [1.0, float("nan"), 2.0, 3.0])])
    svg = ET.fromstring(chart_svg(chart))
    assert "a <b> & c" in texts(svg) and "s<1>" in texts(svg)
    (path,) = series_paths(svg)
    assert path.get("d").count("M") == 2  # the nan splits the line in two


def test_empty_chart_still_renders():
    svg = ET.fromstring(chart_svg(Chart("nothing", "step", "loss", [Series("a", [], [])])))
    assert "no data" in texts(svg)
    ET.fromstring(combined_svg([Chart("nothing", "step", "loss")], title="t"))


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 47, 5) == [10, 20, 30, 40]
    assert nice_ticks(0, 40, 5) == [0, 10, 20, 30, 40]
    assert nice_range(0.0001, 0.69) == (0.0, 0.8)
    assert nice_range(-2e-7, 12.0) == (0.0, 15.0)  # float noise below 0 does not add a step
    assert tick_label(0.25, [0.0, 0.25, 0.5]) == "0.25" and tick_label(1000.0, [0, 1000]) == "1000"


def test_braille_plot_puts_points_where_they_belong():
    chart = Chart("t", "x", "y", [Series("a", [0, 1], [0.0, 1.0])], y_range=(0.0, 1.0))
    rows = plot_series(chart, width=2, height=1).rows()
    # (0, 0) is the bottom-left dot, (1, 1) the top-right one, joined by a diagonal.
    assert ord(rows[0][0][0]) - 0x2800 & 0x40 and ord(rows[0][-1][0]) - 0x2800 & 0x08


def test_png_with_cairosvg(tmp_path):
    pytest.importorskip("cairosvg")  # the `png` extra
    run = write_run(tmp_path / "run")
    assert main(["report", str(run), "--output", str(tmp_path / "r.png"), "--quiet"]) == 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_loss_mixture_shows_its_losses_weights_and_the_beta_it_ran_with(tmp_path, capsys):
    run = write_run(tmp_path / "run", loss="sigmoid bco_pair sft", loss_weights=[0.8, 0.2, 1.0])
    assert main(["report", str(run), "--quiet"]) == 0
    page = (run / "report.html").read_text()
    assert "sigmoid bco_pair sft (weights 0.8, 0.2, 1), beta 0.1" in page
