"""Summarise train.py's runs: accuracy over seeds as a Markdown table, and training curves.

    python report.py                                 # runs below runs/: runs/report.md, report.csv, curves.png, spectrum.png
    python report.py runs/ other/runs/ --out results/   # pool several folders (seeds run on different machines)
    python report.py --synthetic                     # only the synthetic-data runs: runs/synthetic-report.md, ...

Runs whose configurations differ only in the seed (or in where and how fast they ran) make one row: mean and sample
standard deviation of the test accuracy at the last epoch and at the best epoch. Runs on synthetic data (--dataset
fake, fake-full) test the code, not the method: they are counted but left out unless --synthetic asks for them alone.
The figures have a colour per row: curves.png the test accuracy and loss terms per epoch, spectrum.png the spectrum of
the projector of the rows that have one (srd): FIGURE, below, in report.md too.
"""
import csv
import json
import math
import os
import statistics
import sys
import textwrap
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only: no display is needed, or present on a training machine
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np

import cli

# Keys of config.json that never split a group: the seed (what a row averages over), where the data and the teacher's
# file live (the teacher is told apart by its file's sha256), and the speed switches, which change at most the order
# of float32 operations (the device's random streams differ, as another seed's would; --teacher-cache gives
# bit-identical results). The precision is not one of them: bf16 and fp16 autocast round every activation to 8 and
# 11 significant bits, by an effect on accuracy nobody here has measured, and the paper's numbers are float32, so
# bf16, fp16 and fp32 runs stay in separate rows.
NOT_THE_EXPERIMENT = ("seed", "data_dir", "no_download", "device", "device_name", "capability",
                      "compile", "channels_last", "fused_sgd", "cuda_graphs", "teacher_cache", "teacher_file")
TEACHER_IDENTITY = "teacher_sha256"  # train.py records the teacher file's hash; runs before it have only the path
COLUMNS_OF_THE_TABLE = ("student", "teacher", "method")  # shown in columns of their own, not among the flags
SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # train.py's lr-0.01 students
SYNTHETIC_DATASETS = ("fake", "fake-full")  # data.py's generated images: smoke and timing runs, never results
LOSS_STYLES = {"loss_ce": "-", "loss_feat": "--", "loss_kd": ":"}
LAYER_STYLES = {"proj1": "-", "proj2": "--"}  # the projector's linear layers (mlp has two, linear one)
SPECTRUM_PANELS = {"sv_over_1pct": "singular values above 1% of the largest", "effective_rank": "effective rank"}
SPECTRUM_COLUMNS = tuple(f"{layer}_{what}" for layer in LAYER_STYLES for what in SPECTRUM_PANELS)
MARKERS_UP_TO = 20  # epochs: a curve this short has a marker per epoch (a one-epoch line is otherwise invisible)
CSV_FIELDS = ("teacher", "student", "method", "setting", "runs", "seeds", "last_acc_mean", "last_acc_std",
              "best_acc_mean", "best_acc_std", "teacher_acc", "wall_time_s", "folders")
FOOTER = """Top-1 test accuracy (%): mean ± sample standard deviation (ddof=1) over a row's runs, which differ only in
--seed and in what does not change the experiment (device, data folder, speed switches other than --precision); "–"
where a row has a single run. Last epoch: the accuracy after the final epoch (what RepDistiller and CRD report). Best
epoch: the highest test accuracy over all epochs (what DKD and mdistiller report; picked on the test set, so it
flatters). Setting: the flags where a row departs from the paper's recipe, whose arithmetic is float32 (--precision
fp32). Wall time: mean per run."""
FIGURE = """curves.png, a colour per row, means over its seeds per epoch: the test accuracy (with a min-max band) and
each loss term used. spectrum.png, for rows whose runs have a projector (srd), the projector's spectrum from log.csv:
how many singular values of each linear layer exceed 1% of its largest, and its effective rank exp(H(s / sum s))."""


class BadRun(Exception):
    """A run folder whose files cannot be trusted: it is reported and left out."""


def recipe_defaults(config):
    """What config.json holds for a flag not given (test_report.py checks this against train.resolve_config).

    A key that an older config.json lacks takes this value, so old and new runs of one experiment group together."""
    kd, srd, epochs = config["method"] == "kd", config["method"] == "srd", config.get("epochs", 240)
    return {"teacher": None, "teacher_ckpt": None, "feat_weight": 2.0 if srd else 0.0,
            "kd_weight": 0.9 if kd else 0.0, "ce_weight": 0.1 if kd else 1.0, "temperature": 4.0,
            "projector": "mlp", "hidden_dim": 1024, "norm": "bn", "distance": "logsum", "alpha": 4.0,
            "epochs": 240, "milestones": [max(1, epochs * k // 8) for k in (5, 6, 7)], "batch_size": 64,
            "weight_decay": 5e-4, "lr": 0.01 if config["student"] in SMALL_LR_STUDENTS else 0.05,
            "dataset": "cifar100", "train_subset": None,
            "precision": "fp32"}  # the paper's arithmetic; on GPUs train.py picks bf16 or fp16, for speed


def number(value, where):
    """A finite float from a JSON number or a CSV cell; anything else (text, NaN, None from a cut row) is bad."""
    try:
        result = float(value) if isinstance(value, str) or type(value) in (int, float) else math.nan
    except ValueError:
        result = math.nan
    if not math.isfinite(result):
        raise BadRun(f"{where} is not a number: {value!r}")
    return result


def read_json(path, required):
    try:
        return cli.read_json(path, required)
    except ValueError as error:
        raise BadRun(str(error)) from None


def read_log(path):
    """log.csv's curves as {column: [one value per epoch]}; anything but whole numeric rows from epoch 1 is bad. The
    projector's spectrum is optional (older logs, runs without one): an empty cell is NaN, an empty column absent."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or ()  # None for an empty file
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadRun(f"{path}: unreadable ({error})")
    missing = {"epoch", "test_acc", *LOSS_STYLES} - set(header)
    if missing:
        raise BadRun(f"{path}: no column {', '.join(sorted(missing))}")
    curves = {c: [number(row[c], f"{path}: {c} in row {i + 1}") for i, row in enumerate(rows)]
              for c in ("epoch", "test_acc", *LOSS_STYLES)}
    if curves["epoch"] != list(range(1, len(rows) + 1)):
        raise BadRun(f"{path}: epochs are not 1, 2, 3, ...")
    for c in [c for c in SPECTRUM_COLUMNS if c in header]:  # empty in the rows of a run resumed from before the columns
        values = [number(row[c], f"{path}: {c} in row {i + 1}") if row[c] else math.nan for i, row in enumerate(rows)]
        if not all(map(math.isnan, values)):
            curves[c] = values
    return curves


def find_runs(runs_dirs):
    """Every run folder (one holding config.json) below runs_dirs -> finished runs, unfinished runs as (config,
    line), problems."""
    finished, unfinished, problems = [], [], []
    for config_path in sorted(path for folder in runs_dirs for path in folder.rglob("config.json")):
        folder = config_path.parent
        try:
            config = read_json(config_path, ("student", "method"))
            bf16 = config.pop("bf16", None)  # an older train.py's switch, where today's records "precision"
            config = {"precision": "bf16" if bf16 else "fp32", **config} if bf16 is not None else config
            config = {**recipe_defaults(config), **config}
            logged = (folder / "log.csv").exists()
            if not (folder / "summary.json").exists():
                epochs = len(read_log(folder / "log.csv")["epoch"]) if logged else 0
                unfinished.append((config, f"{folder}: {epochs} of {config['epochs']} epochs logged"))
                continue
            summary = read_json(folder / "summary.json", ("last_accuracy", "best_accuracy", "last_epoch",
                                                         "teacher_accuracy", "wall_time_s"))
            numbers = {key: number(summary[key], f"{folder / 'summary.json'}: {key}")
                       for key in ("last_accuracy", "best_accuracy", "last_epoch", "wall_time_s")}
            if summary["teacher_accuracy"] is not None:
                numbers["teacher_accuracy"] = number(summary["teacher_accuracy"],
                                                   f"{folder / 'summary.json'}: teacher_accuracy")
            if not logged:
                raise BadRun(f"{folder / 'log.csv'}: missing")
            curves = read_log(folder / "log.csv")
            if len(curves["epoch"]) != numbers["last_epoch"]:  # a log cut short, or one from another run
                raise BadRun(f"{folder / 'log.csv'}: {len(curves['epoch'])} epochs, summary.json says "
                             f"{numbers['last_epoch']:.0f}")
            finished.append({"folder": folder, "config": config, "curves": curves, **numbers})
        except BadRun as error:
            problems.append(str(error))
    return finished, unfinished, problems


def experiment(config):
    """The configuration less the keys that do not change the experiment: equal for runs that are seeds of a row.
    Where the teacher's hash is known, its checkpoint's path does not matter (one file, two machines)."""
    ignored = {*NOT_THE_EXPERIMENT, *(["teacher_ckpt"] if config.get(TEACHER_IDENTITY) else [])}
    return tuple(sorted((key, json.dumps(value)) for key, value in config.items() if key not in ignored))


def flags(config):
    """train.py's flags where this configuration departs from the recipe (a key unknown here is always shown)."""
    defaults, shown = recipe_defaults(config), []
    for key, value in config.items():
        if (key in NOT_THE_EXPERIMENT or key in COLUMNS_OF_THE_TABLE or key == TEACHER_IDENTITY
                or key in defaults and defaults[key] == value):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            shown.append(flag if value else "--no-" + flag[2:])
        else:
            shown.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return shown


def setting(config):
    return " ".join(flags(config))


def name(config):
    return f"{config['teacher']} -> {config['student']} {config['method']}" if config["teacher"] else \
        f"{config['student']} alone"


def group_runs(runs):
    """The runs of each experiment together, by seed; the groups by dataset, student, teacher and method."""
    by_experiment = {}
    # by seed (right-justified text: numeric order for train.py's integers, and no crash on a hand-edited one)
    for run in sorted(runs, key=lambda r: (str(r["config"].get("seed")).rjust(20), str(r["folder"]))):
        by_experiment.setdefault(experiment(run["config"]), []).append(run)
    return sorted(by_experiment.values(), key=lambda g: [str(g[0]["config"][key] or "") for key in
                                                         ("dataset", "student", "teacher", "method")])


def summarise(runs):
    """One row of the table from the runs of one experiment."""
    config = runs[0]["config"]
    row = {"teacher": config["teacher"] or "", "student": config["student"], "method": config["method"],
           "setting": setting(config), "runs": len(runs), "seeds": " ".join(str(r["config"].get("seed")) for r in runs),
           "folders": " ".join(str(r["folder"]) for r in runs)}
    for which in ("last", "best"):
        accuracies = [r[f"{which}_accuracy"] for r in runs]
        row[f"{which}_acc_mean"] = statistics.mean(accuracies)
        row[f"{which}_acc_std"] = statistics.stdev(accuracies) if len(runs) > 1 else None  # stdev: ddof=1
    teacher_accuracies = [r["teacher_accuracy"] for r in runs if "teacher_accuracy" in r]
    row["teacher_acc"] = statistics.mean(teacher_accuracies) if teacher_accuracies else None
    row["wall_time_s"] = statistics.mean(r["wall_time_s"] for r in runs)
    return row


def markdown(heading, rows, notes, paragraphs):
    """report.md: the table, what its numbers are, each row's run folders, the notes ((title, lines), those with
    lines), the paragraphs."""
    def accuracy(mean, std):
        return f"{mean:.2f} ± " + ("–" if std is None else f"{std:.2f}")

    lines = [f"# {heading}", "", "| teacher | student | method | setting | runs | last epoch (%) | best epoch (%) "
             "| teacher (%) | wall time (min) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        teacher_acc = "–" if r["teacher_acc"] is None else f"{r['teacher_acc']:.2f}"
        lines.append(f"| {r['teacher'] or '–'} | {r['student']} | {r['method']} | {r['setting']} | {r['runs']} | "
                     f"{accuracy(r['last_acc_mean'], r['last_acc_std'])} | "
                     f"{accuracy(r['best_acc_mean'], r['best_acc_std'])} | {teacher_acc} | "
                     f"{r['wall_time_s'] / 60:.1f} |")
    notes = [("Run folders of each row:", [f"{r['teacher'] or '–'} | {r['student']} | {r['method']} | "
                                           f"{r['setting']}: {r['folders']}" for r in rows]), *notes]
    for text in [FOOTER.replace("\n", " "), *("\n".join([title, *(f"- {item}" for item in items)])
                                              for title, items in notes if items), *paragraphs]:
        lines += ["", text]
    return "\n".join(lines) + "\n"


def mean_curves(runs):
    """A group's curves over the epochs all its runs have: each column's mean over the runs, the test accuracy's min
    and max; a spectrum column only where every run logged it (a gap, NaN, at an epoch where one did not)."""
    epochs = min(len(r["curves"]["epoch"]) for r in runs)
    stacked = {column: np.array([r["curves"][column][:epochs] for r in runs])
               for column in ("test_acc", *LOSS_STYLES, *SPECTRUM_COLUMNS) if all(column in r["curves"] for r in runs)}
    return {"epoch": np.arange(1, epochs + 1), **{column: values.mean(0) for column, values in stacked.items()},
            "test_acc_min": stacked["test_acc"].min(0), "test_acc_max": stacked["test_acc"].max(0)}


def style_legend(axes, styles):
    """A legend of the line styles {label: style} that axes has drawn, no other (the figure's legend has colours)."""
    drawn = {line.get_linestyle() for line in axes.lines}
    handles = [plt.Line2D([], [], color="black", linestyle=s, label=label) for label, s in styles.items() if s in drawn]
    if handles:
        axes.legend(handles=handles)


def plot(groups, path, spectrum_path):
    """FIGURE: the curves into path, the spectrum (where a group has one) into spectrum_path. Returns the (closed)
    figures, the second None without a spectrum: axes [accuracy, loss] and [count, effective rank], each line
    labelled "<group>: <column>" (accuracy: "<group> (n=<runs>)")."""
    curves = [mean_curves(runs) for runs in groups]
    spectrum = any(column in series for series in curves for column in SPECTRUM_COLUMNS)
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    spectrum_figure, spectrum_axes = plt.subplots(1, 2, figsize=(12, 4.5)) if spectrum else (None, [])
    shown = [flags(runs[0]["config"]) for runs in groups]
    common = [flag for flag in shown[0] if all(flag in other for other in shown)]  # said once, in the title
    labels = [" ".join([name(runs[0]["config"]), *(f for f in group_flags if f not in common)])
              for runs, group_flags in zip(groups, shown)]
    for i, (runs, series) in enumerate(zip(groups, curves)):
        x = series["epoch"]
        style = {"color": f"C{i % 10}", "marker": "o" if len(x) <= MARKERS_UP_TO else None, "markersize": 3}
        accuracy_axes.plot(x, series["test_acc"], label=f"{labels[i]} (n={len(runs)})", **style)
        accuracy_axes.fill_between(x, series["test_acc_min"], series["test_acc_max"], color=style["color"], alpha=0.2)
        lines = [(loss_axes, column, LOSS_STYLES[column]) for column in LOSS_STYLES
                 if series[column].any()]  # a term the method does not use is logged as zeros
        lines += [(panel, f"{layer}_{what}", LAYER_STYLES[layer]) for panel, what in zip(spectrum_axes, SPECTRUM_PANELS)
                  for layer in LAYER_STYLES if f"{layer}_{what}" in series]
        for panel, column, linestyle in lines:
            panel.plot(x, series[column], linestyle=linestyle, label=f"{labels[i]}: {column}", **style)
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy: mean, band min-max over seeds")
    loss_axes.set(xlabel="epoch", ylabel="mean training loss term", title="loss terms (colours as on the left)")
    style_legend(loss_axes, {column.removeprefix("loss_"): style for column, style in LOSS_STYLES.items()})
    for panel, (what, title) in zip(spectrum_axes, SPECTRUM_PANELS.items()):
        panel.set(xlabel="epoch", ylabel=what, title=f"projector: {title}, mean over seeds")
        style_legend(panel, {f"linear layer {layer[-1]}": style for layer, style in LAYER_STYLES.items()})
    shared = "\n" + textwrap.fill("all groups: " + " ".join(common), 130) if common else ""
    for fig, file, what in ((figure, path, "Test accuracy and training loss"),
                            (spectrum_figure, spectrum_path, "The projector's singular values")):
        if fig is None:
            continue
        for panel in fig.axes:
            panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        shown = accuracy_axes.lines if fig is figure else [line for line in accuracy_axes.lines
                                                           if any(line.get_color() == other.get_color()
                                                                  for other in spectrum_axes[0].lines)]
        # below the panels: labels can be long
        fig.legend(handles=shown, loc="upper center", bbox_to_anchor=(0.5, 0), fontsize="small")
        fig.suptitle(f"{what} per epoch, {len(groups)} group{'s' * (len(groups) > 1)}, mean over seeds" + shared)
        fig.tight_layout()
        fig.savefig(file, dpi=100, bbox_inches="tight")  # "tight": the figure grows to hold legend and title
        plt.close(fig)
    return figure, spectrum_figure


def unwritable(out):
    """Why the report cannot go into the folder out (made if missing), or None. By this process's permissions: root
    writes into a read-only folder."""
    existing = next(folder for folder in [out, *out.parents] if folder.exists())  # the folder, or where it goes
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    return None if os.access(existing, os.W_OK | os.X_OK) else f"{existing} is not writable"


def select(runs, unfinished, args):
    """The finished and unfinished runs reported (on CIFAR-100, or with --synthetic on synthetic data), and a note
    counting the others, with the command that reports them ("" where there are none)."""
    def wanted(config):
        return (config["dataset"] in SYNTHETIC_DATASETS) == args.synthetic

    chosen, unfinished_chosen = [r for r in runs if wanted(r["config"])], [line for c, line in unfinished if wanted(c)]
    others, other_unfinished = len(runs) - len(chosen), len(unfinished) - len(unfinished_chosen)
    command = " ".join(["python report.py", *map(str, args.runs_dirs), *(["--out", str(args.out)] if args.out else []),
                        *([] if args.synthetic else ["--synthetic"])])
    note = f"{others} finished and {other_unfinished} unfinished runs on " \
           f"{'CIFAR-100' if args.synthetic else 'synthetic data'} are left out: `{command}` reports them instead."
    return chosen, unfinished_chosen, note if others or other_unfinished else ""


def parse_args(argv=None):
    p = cli.Parser(prog="python report.py", description=__doc__)
    p.add_argument("runs_dirs", nargs="*", type=Path, default=[Path("runs")], metavar="RUNS_DIR",
                   help="folders searched, at any depth, for run folders (default runs/); their runs are pooled")
    p.add_argument("--out", type=Path, help="folder for report.md, report.csv and the figures (default the first "
                   "RUNS_DIR)")
    p.add_argument("--synthetic", action="store_true", help="report only the runs on synthetic data (--dataset fake, "
                   "fake-full), into synthetic-report.md, synthetic-report.csv, synthetic-curves.png, ...")
    p.add_argument("--no-plot", action="store_true", help="skip the figures")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for folder in args.runs_dirs:
        if not folder.is_dir():
            sys.exit(f"error: {folder} is not a folder (train.py writes its runs below runs/ unless told --out)")
    out = args.out or args.runs_dirs[0]
    if unwritable(out):  # before anything is read or written
        sys.exit(f"error: cannot write the report into {out}: {unwritable(out)}; nothing was written (--out FOLDER "
                 f"chooses where it goes)")
    runs, unfinished, problems = find_runs(args.runs_dirs)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    chosen, unfinished, left_out = select(runs, unfinished, args)
    if not chosen:
        sys.exit(f"error: no finished run on {'synthetic data' if args.synthetic else 'CIFAR-100'} below "
                 f"{', '.join(map(str, args.runs_dirs))} ({len(unfinished)} unfinished, {len(problems)} unreadable; a "
                 f"finished run folder holds config.json and summary.json)" + (f"; {left_out}" if left_out else ""))

    groups = group_runs(chosen)
    rows = [summarise(group) for group in groups]
    warnings = [f"{name(group[0]['config'])} {row['setting']}: a seed appears twice ({row['folders']})"
                for group, row in zip(groups, rows) if len(set(row["seeds"].split())) < len(group)]
    for warning in warnings:  # say, one run copied into two of the RUNS_DIRs
        print(f"warning: {warning}", file=sys.stderr)
    prefix = "synthetic-" if args.synthetic else ""  # never over the real report
    paths = [out / f"{prefix}{file}" for file in ("report.md", "report.csv", "curves.png", "spectrum.png")]
    figure = FIGURE.replace("\n", " ").replace("curves.png", f"{prefix}curves.png").replace(
        "spectrum.png", f"{prefix}spectrum.png")
    table = markdown("Runs on synthetic data: tests of the code, not results" if args.synthetic else
                     "Runs on CIFAR-100", rows,
                     [("Unfinished runs, not in the table:", unfinished),
                      ("Skipped runs (a file that cannot be trusted), not in the table:", problems),
                      ("Warnings:", warnings)], [text for text in (left_out, not args.no_plot and figure) if text])
    print(table, end="")
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(table)
        with open(paths[1], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)  # full precision; an empty cell where there is no value (None)
        if not args.no_plot:
            plot(groups, paths[2], paths[3])
    except OSError as error:
        sys.exit(f"error: cannot write the report into {out}: {error}")
    print(f"wrote {', '.join(str(path) for path in paths if path.exists())}")
    return rows


if __name__ == "__main__":
    main()
