"""``report.html``: one self-contained HTML page of a run, built from the run folder's files.

Reads ``summary.json``, ``history.json``, ``analysis.json`` and ``posterior.nc`` (what
``sqs-pyro compress`` writes) and embeds every figure as a PNG data URI. Other run folders
given as ``compare`` add a comparison table (window mode, tail errors, accuracy) and the
accuracy-against-compression plot.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from sqs_pyro.analysis import plots
from sqs_pyro.analysis.arviz_adapter import default_backend, load_posterior, posterior_summary
from sqs_pyro.analysis.summary import ANALYSIS_FILE, POSTERIOR_FILE
from sqs_pyro.format.atomic import write_text_atomic
from sqs_pyro.errors import SQSInputError

REPORT_FILE = "report.html"
REQUIRED = ("summary.json", "history.json", ANALYSIS_FILE, POSTERIOR_FILE)


@dataclass(frozen=True)
class RunFiles:
    """The parsed files of one run folder."""

    label: str
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    analysis: dict[str, Any]


@dataclass(frozen=True)
class FigureImage:
    """One embedded figure: HTML id, caption and PNG bytes."""

    id: str
    caption: str
    png: bytes

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def read_run(run_dir: str | os.PathLike) -> RunFiles:
    """Parse a run folder's JSON files; raise :class:`SQSInputError` naming what is missing."""
    run = Path(run_dir)
    missing = [name for name in REQUIRED if not (run / name).is_file()]
    if missing:
        raise SQSInputError(f"{run} lacks {', '.join(missing)}; run `sqs-pyro compress --out {run}` first")
    load = lambda name: json.loads((run / name).read_text())  # noqa: E731
    return RunFiles(run.resolve().name, load("summary.json"), load("history.json"), load(ANALYSIS_FILE))


def _png(draw: Callable[[io.BytesIO], None]) -> bytes:
    buf = io.BytesIO()
    draw(buf)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(fig: FigureImage) -> str:
    return (f'<figure id="{fig.id}"><img src="{fig.data_uri()}" alt="{html.escape(fig.caption)}">'
            f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")


def report_figures(run: RunFiles, posterior: Any, compare: Sequence[RunFiles] = ()) -> list[FigureImage]:
    """Every figure of the report, in page order."""
    a = run.analysis
    figs = [FigureImage("fig-elbo", "Objective (the ELBO, or the surrogate of expected mode), data term and KL "
                                    "per datum over SVI steps (phases shaded)",
                        _png(lambda b: plots.plot_elbo_trace(run.history, b))),
            FigureImage("fig-sparsity-bits", "Per-layer sparsity and bits",
                        _png(lambda b: plots.plot_sparsity_bits(a, b))),
            FigureImage("fig-inclusion", "Inclusion probabilities g per layer (grey: 0.1 < g < 0.9)",
                        _png(lambda b: plots.plot_inclusion_histograms(a["inclusion"], b)))]
    for i, dist in enumerate(a["distributions"]["layers"]):
        figs.append(FigureImage(f"fig-weights-{i}", f"{dist['name']}: weights, learned mixture and quantized values",
                                _png(lambda b, d=dist: plots.plot_weight_histogram(d, b))))
    post = default_backend().group(posterior, "posterior")
    for i, (stem, meta) in enumerate(json.loads(post.attrs["layers"]).items()):
        draws = post[f"w_{stem}"].values[0]
        labels = [f"[{j}]" for j in post[f"{stem}_index"].values]
        figs.append(FigureImage(f"fig-forest-{i}", f"{meta['site']}: posterior draws of sampled weights (flat index)",
                                _png(lambda b, d=draws, lab=labels, t=meta["site"]: plots.plot_forest(d, lab, b, t))))
    if "calibration" in run.summary:
        figs.append(FigureImage("fig-reliability", "Reliability diagram of the test predictions (15 confidence bins)",
                                _png(lambda b: plots.plot_reliability(run.summary["calibration"], b))))
    shift = run.summary.get("shift")
    if shift:
        figs.append(FigureImage("fig-rotation", f"Accuracy and NLL against rotation of the first {shift['images']:,} "
                                                "test images: greedy, greedy temperature-scaled, averaged",
                                _png(lambda b: plots.plot_rotation(shift, b))))
        if shift["ood"]:
            figs.append(FigureImage("fig-ood-entropy", "Predictive entropy, MNIST test against Fashion-MNIST test "
                                                       f"(first {shift['ood']['images']:,} images each)",
                                    _png(lambda b: plots.plot_ood_entropy(shift["ood"], b))))
    if compare:
        runs = [(r.label, r.summary) for r in (run, *compare)]
        figs.append(FigureImage("fig-accuracy-compression", "Test accuracy against compression ratio, per run",
                                _png(lambda b: plots.plot_accuracy_vs_compression(runs, b))))
    return figs


def _overview(run: RunFiles) -> str:
    s, c = run.summary, run.summary.get("config", run.analysis["config"])
    if "accuracy_dense" in s:
        metrics = [("test accuracy: dense / greedy / averaged",
                    f"{s['accuracy_dense']:.4f} / {s['accuracy_greedy']:.4f} / {s['accuracy_averaged']:.4f}")]
    else:  # Hugging Face runs: held-out metrics by name (perplexity or accuracy), when evaluated
        metrics = [(f"held-out {name}: dense / greedy", f"{value:.4f} / {s['greedy'][name]:.4f}")
                   for name, value in s.get("dense", {}).items()]
    rows = [*metrics,
            ("sparsity (achieved)", f"{s['sparsity']:.4f} (target {c['sparsity']})"),
            ("bits per kept weight (K)", f"{s['bits']} ({c['components']})"),
            ("CR formula 32/((1-s)b)", f"{s['cr_formula']:.1f}x"),
            ("fp32 bytes / packed bytes", f"{s['bytes_fp32']:,} / {s['bytes_packed']:,} = {s['packed_ratio']:.1f}x"),
            ("entropy lower bound", f"{s['entropy_bound_bytes']:,.0f} bytes"),
            ("windows, mode, epochs", f"{c['windows']}, {c['mode']}, {c['epochs']}")]
    if "file_bytes" in s:
        rows.insert(len(metrics) + 4, (f"saved file {s.get('file', '')}", f"{s['file_bytes']:,} bytes "
                                                            f"({s['bytes_fp32'] / s['file_bytes']:.1f}x smaller than fp32)"))
    return _table(("quantity", "value"), rows)


def _layer_table(a: dict[str, Any]) -> str:
    rows = []
    for inc, book in zip(a["inclusion"]["layers"], a["codebooks"]["layers"]):
        rows.append((inc["name"], inc["numel"], inc["kept"], inc["thresholded_sparsity"], inc["expected_sparsity"],
                     inc["uncertain_fraction"], inc["magnitude_overlap"], inc["magnitude_jaccard"], book["bits"],
                     book["codes_used"], book["entropy_bits"]))
    o = a["inclusion"]["overall"]
    rows.append(("all layers", o["numel"], o["kept"], o["thresholded_sparsity"], o["expected_sparsity"],
                 o["uncertain_fraction"], o["magnitude_overlap"], o["magnitude_jaccard"], None, None, None))
    return _table(("layer", "weights", "kept", "sparsity (g>0.5)", "expected sum(1-g)/N", "uncertain 0.1<g<0.9",
                   "overlap with magnitude mask", "Jaccard", "bits b", "codes used", "code entropy H (bits)"), rows)


def _outlier_tables(a: dict[str, Any]) -> str:
    o = a["outliers"]
    rows = [(r["name"], f"[{r['fences'][0]:.4g}, {r['fences'][1]:.4g}]", r["n_low"], r["n_high"], r["tail_kept"],
             r["tail_kept_fraction"], r["bulk_kept_fraction"], r["tail_error"]["rms"], r["bulk_error"]["rms"],
             r["tail_error"]["rel_rms"], r["bulk_error"]["rel_rms"]) for r in o["layers"]]
    main = _table(("layer", "fences", "below", "above", "tails kept", "tail kept fraction", "bulk kept fraction",
                   "tail RMS error", "bulk RMS error", "tail rel. RMS", "bulk rel. RMS"), rows)
    abl_rows = []
    for r in o["layers"]:
        ab = r["window_ablation"]
        for mode in ("none", "outlier"):
            abl_rows.append((r["name"], mode, ab["n_tail"], ab[mode]["tail_error"]["rms"], ab[mode]["bulk_error"]["rms"],
                             ab[mode]["tail_error"]["rel_rms"], ab[mode]["bulk_error"]["rel_rms"]))
    ablation = _table(("layer", "windows", "tails", "tail RMS error", "bulk RMS error", "tail rel. RMS",
                       "bulk rel. RMS"), abl_rows)
    listed = [(r["name"], t["index"], t["value"], t["g"], t["kept"], t["quantized"])
              for r in o["layers"] for t in r["listed"][:10]]
    return (f"<p>Tukey fences Q1 &minus; c&middot;IQR, Q3 + c&middot;IQR with c = {o['iqr_factor']} on the "
            f"pretrained weights; this run used <b>{html.escape(o['windows'])}</b> windows. Errors are "
            "compressed minus pretrained value over the kept weights.</p>" + main +
            "<h3>With and without outlier-aware windows (initial codebooks, before training)</h3>"
            "<p>Each pretrained weight snapped to the nearest level of its window's k-means codebook.</p>"
            + ablation + "<details><summary>Largest tail weights (up to 10 per layer)</summary>"
            + _table(("layer", "flat index", "pretrained", "g", "kept", "compressed"), listed) + "</details>")


def _codebook_tables(a: dict[str, Any]) -> str:
    parts = []
    for book in a["codebooks"]["layers"]:
        rows = [(w["window"], k, mu, pi, s, n) for w in book["windows"]
                for k, mu, pi, s, n in zip(w["components"], w["locs"], w["mix"], w["scales"], w["counts"])]
        merge = "; ".join(f"{m['components'][0]}+{m['components'][1]} (gap {m['gap_in_scales']:.2f} scales)"
                          for m in book["merge"]) or "none"
        drop = ", ".join(str(k) for k in book["drop"]) or "none"
        parts.append(f"<details><summary>{html.escape(book['name'])}: {book['codes_used']}/{book['components']} codes "
                     f"used, entropy {book['entropy_bits']:.3f} bits; merge: {html.escape(merge)}; drop: {drop}"
                     "</summary>" + _table(("window", "level k", "mu_k", "pi_k", "s_k", "kept weights"), rows)
                     + "</details>")
    sep = a["codebooks"]["separation"]
    return (f"<p>Merge candidates: neighbouring levels of one window closer than {sep} pooled scales; drop "
            "candidates: levels no kept weight uses. Code entropy = effective bits per kept weight.</p>"
            + "".join(parts))


def _posterior_section(posterior: Any) -> str:
    backend = default_backend()
    post = backend.group(posterior, "posterior")
    groups = ", ".join(backend.group_names(posterior))
    parts = []
    for stem, meta in json.loads(post.attrs["layers"]).items():
        table = posterior_summary(posterior, [f"w_{stem}", f"locs_{stem}", f"scales_{stem}", f"mix_{stem}"])
        parts.append(f"<details><summary>{html.escape(meta['site'])}</summary>"
                     + table.to_html(float_format=lambda v: f"{v:.4g}", border=0) + "</details>")
    draws = post.sizes["draw"]
    return (f"<p>posterior.nc groups: {html.escape(groups)}; {draws} independent draws from the variational "
            "posterior. R-hat, MCSE and other chain diagnostics do not apply to independent variational "
            f"draws (the ESS is the number of draws, {draws}); codebook parameters are point estimates "
            "(sd 0). Load with <code>sqs_pyro.analysis.load_posterior</code> and use "
            "<code>az.summary(kind=\"stats\")</code>, <code>az.plot_posterior</code>, "
            "<code>az.plot_forest</code>.</p>" + "".join(parts))


def _calibration_section(run: RunFiles, by_id: dict[str, str]) -> str:
    """Test NLL, Brier score and ECE of each predictor, and the reliability diagram (classification runs)."""
    metrics = run.summary.get("calibration")
    if not metrics:
        return ""
    rows = [(name, m["accuracy"], m["nll"], m["brier"], m["ece"]) for name, m in metrics.items()]
    return ("<h2>Calibration</h2><p>The greedy network is the headline predictor; the averaged one is "
            "the posterior predictive over networks drawn from q.</p>"
            + _table(("predictor", "accuracy", "NLL (nats)", "Brier", "ECE (15 bins)"), rows)
            + by_id["fig-reliability"] + _shift_section(run, by_id))


def _shift_section(run: RunFiles, by_id: dict[str, str]) -> str:
    """Calibration under rotation and the out-of-distribution entropy histogram (when the run measured them)."""
    shift = run.summary.get("shift")
    if not shift:
        return ""
    rows = [(name, metric, *values) for name, m in shift["predictors"].items()
            for metric, values in m.items() if metric in ("accuracy", "nll", "ece")]
    text = (f"<h3>Under rotation</h3><p>Measured on the first {shift['images']:,} test images only (a subset, so "
            "that the default run stays fast"
            + (f": {shift['seconds']:.0f} s" if "seconds" in shift else "") + "); temperature T = "
            f"{shift['temperature']:.4g} fitted on the first {shift['val_images']:,} validation images.</p>"
            + _table(("predictor", "metric", *[f"{a}°" for a in shift["rotations"]]), rows)
            + by_id["fig-rotation"])
    ood = shift["ood"]
    if not ood:
        return text + ("<h3>Out of distribution</h3><p>Fashion-MNIST was not given, so there is no OOD entropy "
                       "histogram: run <code>make assets-fashion</code> and pass <code>--fashion assets/fashion</code> "
                       "to <code>sqs-pyro compress</code>.</p>")
    return (text + f"<h3>Out of distribution</h3><p>AUROC of telling Fashion-MNIST test images from MNIST test images "
            f"by predictive entropy (first {ood['images']:,} images of each).</p>"
            + _table(("predictor", "AUROC"), list(ood["auroc"].items())) + by_id["fig-ood-entropy"])


def _objective_section(run: RunFiles, posterior: Any) -> str:
    """Which objective produced the posterior, and the learned slab scales and mixing weights per layer."""
    backend = default_backend()
    attrs = backend.group(posterior, "posterior").attrs
    kind = run.summary.get("objective_kind", attrs.get("objective_kind", "unknown"))
    phases = json.loads(backend.group(posterior, "sample_stats").attrs.get("phase_objectives", "{}"))
    rows = [(book["name"], w["window"], " ".join(f"{v:.3g}" for v in w["scales"]),
             " ".join(f"{v:.3f}" for v in w["mix"])) for book in run.analysis["codebooks"]["layers"]
            for w in book["windows"]]
    return (f"<p>Objective: <b>{html.escape(kind)}</b> (per phase: "
            + html.escape("; ".join(f"{p}: {', '.join(k)}" for p, k in phases.items()) or "not recorded")
            + f"). Slab scales s_k and mixing weights pi_k: {html.escape(attrs.get('scales_and_mix', 'not recorded'))}."
            " Final values below (the values at the end of the point phases are not recorded).</p>"
            + _table(("layer", "window", "slab scales s_k", "mixing weights pi_k"), rows))


def _compare_table(runs: Sequence[RunFiles]) -> str:
    rows = []
    for r in runs:
        s, o = r.summary, r.analysis["outliers"]["overall"]
        rows.append((r.label, r.analysis["config"]["windows"], r.analysis["config"]["components"], s["sparsity"],
                     s["accuracy_greedy"], s["accuracy_averaged"], s["packed_ratio"], s["cr_formula"],
                     o["n_tail"], o["tail_kept"], o["tail_error"]["rms"], o["bulk_error"]["rms"]))
    return _table(("run", "windows", "K", "sparsity", "acc. greedy", "acc. averaged", "fp32/packed", "CR formula",
                   "tails", "tails kept", "tail RMS error", "bulk RMS error"), rows)


CSS = """body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#f0f0f0}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#555}details{margin:.4em 0}"""


def render_report(run: RunFiles, posterior: Any, compare: Sequence[RunFiles] = ()) -> tuple[str, list[FigureImage]]:
    """The report's HTML text and the figures it embeds."""
    figs = report_figures(run, posterior, compare)
    by_id = {f.id: _figure_html(f) for f in figs}
    a = run.analysis
    weights = "".join(v for k, v in by_id.items() if k.startswith("fig-weights-"))
    forests = "".join(v for k, v in by_id.items() if k.startswith("fig-forest-"))
    comparison = ""
    if compare:
        comparison = ("<h2>Runs compared</h2>" + _compare_table([run, *compare])
                      + by_id["fig-accuracy-compression"])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (f"<h1>SQS compression report: {html.escape(run.label)}</h1><p>generated {stamp}</p>"
            + _overview(run)
            + _calibration_section(run, by_id)
            + "<h2>Training</h2>" + by_id["fig-elbo"]
            + "<h2>Layers: sparsity, inclusion and bits</h2>" + _layer_table(a) + by_id["fig-sparsity-bits"]
            + "<h2>Inclusion probabilities</h2><p>Expected sparsity sum(1-g)/N against the thresholded one "
              "(kept: g &gt; 0.5); overlap: fraction of kept weights that magnitude pruning of the pretrained "
              "weights at the same sparsity also keeps.</p>" + by_id["fig-inclusion"]
            + "<h2>Tail outliers</h2>" + _outlier_tables(a)
            + "<h2>Codebooks</h2>" + _codebook_tables(a) + weights
            + "<h2>Learned posterior</h2>" + _objective_section(run, posterior)
            + "<h2>Posterior (ArviZ)</h2>" + _posterior_section(posterior) + forests
            + comparison)
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>SQS report: "
            f"{html.escape(run.label)}</title><style>{CSS}</style></head><body>{body}</body></html>")
    return page, figs


def build_report(run_dir: str | os.PathLike, compare: Sequence[str | os.PathLike] = (),
                 out: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` (default: inside ``run_dir``) from the run folder's files; return its path."""
    run = read_run(run_dir)
    posterior = load_posterior(Path(run_dir) / POSTERIOR_FILE)
    page, _ = render_report(run, posterior, [read_run(d) for d in compare])
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    write_text_atomic(path, page)
    return path
