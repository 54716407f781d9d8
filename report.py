"""Summarise train.py's runs: accuracy over seeds as a Markdown table, and training curves.

    python report.py                                   # runs below runs/: runs/report.md, report.csv, the figures
    python report.py runs/ other/runs/ --out results/  # pool several folders (seeds run on different machines)

Runs whose configurations differ only in the seed (or in where and how fast they ran) make one row: mean and sample
standard deviation of the test accuracy at the last epoch and at the best epoch. The dataset is a column: runs on
synthetic data (--dataset fake, fake-full) test the code, not the method, and never share a row with CIFAR-100's.
The figures, which report.md describes too:
"""
import contextlib
import csv
import json
import math
import reprlib
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
# file live (the data's checksum, which older runs lack, is checked on resume; the teacher is told apart by its
# sha256), and the speed switches that change at most the order of float32 operations (as another seed's random
# streams would; --teacher-cache is bit-identical). Not the precision nor TF32: bf16, fp16 and TF32 keep 8, 11 and 11
# significant bits, by an effect on accuracy nobody here has measured, and the paper's numbers are float32.
NOT_THE_EXPERIMENT = ("seed", "data_dir", "data_md5", "no_download", "device", "device_name", "capability",
                      "compile", "channels_last", "fused_sgd", "cuda_graphs", "teacher_cache", "teacher_file")
TEACHER_IDENTITY = "teacher_sha256"  # train.py records the teacher file's hash; runs before it have only the path
COLUMNS_OF_THE_TABLE = ("dataset", "student", "teacher", "method")  # shown in columns of their own, not among flags
LOSS_STYLES = {"loss_ce": "-", "loss_feat": "--", "loss_kd": ":"}
LAYER_STYLES = {"proj1": "-", "proj2": "--"}  # the projector's linear layers (mlp has two, linear one)
SPECTRUM_PANELS = {"sv_over_1pct": "singular values above 1% of the largest", "effective_rank": "effective rank"}
SPECTRUM_COLUMNS = tuple(f"{layer}_{what}" for layer in LAYER_STYLES for what in SPECTRUM_PANELS)
MARKERS_UP_TO = 20  # epochs: a curve this short has a marker per epoch (a one-epoch line is otherwise invisible)
CSV_FIELDS = ("dataset", "teacher", "student", "method", "setting", "runs", "seeds", "last_acc_mean", "last_acc_std",
              "best_acc_mean", "best_acc_std", "teacher_acc", "wall_time_s", "folders")
FOOTER = """Top-1 test accuracy (%): mean ± sample standard deviation (ddof=1) over a row's runs, which differ only in
--seed and in what does not change the experiment (device, data folder, speed switches but --precision, TF32); "–"
where a row has a single run. Last epoch: the accuracy after the final epoch (what RepDistiller and CRD report). Best
epoch: the highest test accuracy over all epochs (what DKD and mdistiller report; picked on the test set, so it
flatters). Setting: the flags where a row departs from the paper's recipe, whose arithmetic is float32 (--precision
fp32). Wall time: mean per run."""
FIGURE = """curves.png, a colour per row, means over its seeds per epoch: the test accuracy (with a min-max band) and
each loss term used. spectrum.png, for rows whose runs have a projector (srd), from log.csv: each linear layer's
effective rank exp(H(s / sum s)) and, where it varies, how many singular values exceed 1% of the largest. accuracy.png:
each row's accuracy at the last epoch, a dot per run, with its mean ± std."""


class BadRun(ValueError):
    """A run folder whose files cannot be trusted (cli.read_json's ValueError too): it is reported and left out."""


def recipe_defaults(config):
    """What config.json holds for a flag not given (on GPUs train.py picks bf16 or fp16, for speed), and what an older
    one means by a missing key, so old and new runs group: cli.recipe's values, data.py's dataset, float32, no TF32."""
    return {"teacher": None, "teacher_ckpt": None, "dataset": "cifar100", "train_subset": None, "precision": "fp32",
            "tf32": False, **cli.recipe(config["method"], config["student"], config["epochs"])}


def number(value, where, kinds=(str,), percent=False):
    """A finite float (percent: in [0, 100]) from a type in kinds: str for CSV cells, int or float (no bool) in JSON."""
    with contextlib.suppress(ValueError, OverflowError):  # text that is no number, a 400-digit integer
        if type(value) in kinds and math.isfinite(result := float(value)) and (not percent or 0 <= result <= 100):
            return result
    raise BadRun(f"{where} is not a {'percentage' if percent else 'number'}: {reprlib.repr(value)}")


def read_log(path):
    """log.csv's curves as {column: [one value per epoch]}; anything but whole numeric rows from epoch 1 is bad. The
    projector's spectrum is optional (older logs, runs without one): an empty cell is NaN, an empty column absent."""
    try:
        with open(path, newline="") as f:
            rows, header = list(reader := csv.DictReader(f)), reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadRun(f"{path}: unreadable ({error})")
    if header is None:  # train.py writes the header before the first epoch: an empty file lost what it held
        raise BadRun(f"{path}: empty (no header, no epoch)")
    if missing := {"epoch", "test_acc", *LOSS_STYLES} - set(header):
        raise BadRun(f"{path}: no column {', '.join(sorted(missing))}")
    curves = {c: [number(row[c], f"{path}: {c} in row {i + 1}", percent=c == "test_acc") for i, row in enumerate(rows)]
              for c in ("epoch", "test_acc", *LOSS_STYLES)}
    if curves["epoch"] != list(range(1, len(rows) + 1)):
        raise BadRun(f"{path}: epochs are not 1, 2, 3, ...")
    for c in [c for c in SPECTRUM_COLUMNS if c in header]:  # empty in the rows of a run resumed from before the columns
        values = [number(row[c], f"{path}: {c} in row {i + 1}") if row[c] else math.nan for i, row in enumerate(rows)]
        if not all(map(math.isnan, values)):
            curves[c] = values
    return curves


def find_runs(runs_dirs):
    """Every run folder (one holding config.json) below runs_dirs -> finished runs, unfinished runs' lines, problems."""
    finished, unfinished, problems = [], [], []
    for config_path in sorted(path for folder in runs_dirs for path in folder.rglob("config.json")):
        folder = config_path.parent
        try:
            for path in (config_path, folder / "summary.json", folder / "log.csv"):
                if path.exists() and not path.is_file():  # a FIFO would block the report, a device might never end
                    raise BadRun(f"{path}: not a regular file")
            config = {"epochs": cli.EPOCHS, **cli.read_json(config_path, ("student", "method"))}
            if type(config["epochs"]) is not int or config["epochs"] < 1:  # the milestones' default is computed from it
                raise BadRun(f"{config_path}: epochs is not a positive whole number: {config['epochs']!r}")
            config = {**recipe_defaults(config), **config}
            if not (folder / "summary.json").exists():
                epochs = len(read_log(folder / "log.csv")["epoch"]) if (folder / "log.csv").exists() else 0
                unfinished.append(f"{folder}: {epochs} of {config['epochs']} epochs logged")
                continue
            keys = ("last_accuracy", "best_accuracy", "last_epoch", "wall_time_s", "teacher_accuracy")
            summary = cli.read_json(folder / "summary.json", keys)
            numbers = {key: number(summary[key], f"{folder / 'summary.json'}: {key}", (int, float), "accuracy" in key)
                       for key in keys if summary[key] is not None or key != "teacher_accuracy"}  # None: no teacher
            curves = read_log(folder / "log.csv")  # a missing one: unreadable
            if len(curves["epoch"]) != numbers["last_epoch"]:  # a log cut short, or one from another run
                raise BadRun(f"{folder / 'log.csv'}: {len(curves['epoch'])} epochs, summary.json says "
                             f"{numbers['last_epoch']:.0f}")
            finished.append({"folder": folder, "config": config, "curves": curves, **numbers})
        except ValueError as error:  # BadRun, and cli.read_json's
            problems.append(str(error))
    return finished, unfinished, problems


def experiment(config):
    """The configuration less the keys that do not change the experiment (cli.inert's too): equal for runs that are
    seeds of a row. Where the teacher's hash is known, its checkpoint's path does not matter (one file, two hosts)."""
    ignored = {*NOT_THE_EXPERIMENT, *cli.inert(config), *(["teacher_ckpt"] if config.get(TEACHER_IDENTITY) else [])}
    return tuple(sorted((key, json.dumps(value)) for key, value in config.items() if key not in ignored))


def flags(config):
    """train.py's flags where this configuration departs from the recipe (a key unknown here always; no inert one, nor
    the teacher's path where its sha256 is known: as in experiment()), in alphabetical order whatever config.json's."""
    defaults, shown, inert = recipe_defaults(config), [], cli.inert(config)
    for key, value in sorted(config.items()):
        if (key in NOT_THE_EXPERIMENT or key in COLUMNS_OF_THE_TABLE or key == TEACHER_IDENTITY or key in inert
                or key in defaults and defaults[key] == value or key == "teacher_ckpt" and TEACHER_IDENTITY in config):
            continue
        flag = key.replace("_", "-")
        shown.append((f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else
                     f"--{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return shown


def name(config):
    on = "" if config["dataset"] == "cifar100" else f" on {config['dataset']}"
    return (f"{config['teacher']} -> {config['student']} {config['method']}" if config["teacher"] else
            f"{config['student']} alone") + on


def group_runs(runs):
    """The runs of each experiment together, by seed; the groups by dataset, student, teacher and method."""
    by_experiment = {}
    # by seed (right-justified text: numeric order for train.py's integers, and no crash on a hand-edited one)
    for run in sorted(runs, key=lambda r: (str(r["config"].get("seed")).rjust(20), str(r["folder"]))):
        by_experiment.setdefault(experiment(run["config"]), []).append(run)
    return sorted(by_experiment.values(),
                  key=lambda group: [str(group[0]["config"][key] or "") for key in COLUMNS_OF_THE_TABLE])


def summarise(runs):
    config = runs[0]["config"]
    row = {**{key: config[key] or "" for key in COLUMNS_OF_THE_TABLE}, "setting": " ".join(flags(config)),
           "runs": len(runs), "seeds": " ".join(str(r["config"].get("seed")) for r in runs),
           "folders": " ".join(str(r["folder"]) for r in runs)}
    for which in ("last", "best"):
        accuracies = [r[f"{which}_accuracy"] for r in runs]
        row[f"{which}_acc_mean"] = statistics.mean(accuracies)
        row[f"{which}_acc_std"] = statistics.stdev(accuracies) if len(runs) > 1 else None  # stdev: ddof=1
    teacher_accuracies = [r["teacher_accuracy"] for r in runs if "teacher_accuracy" in r]
    return {**row, "teacher_acc": statistics.mean(teacher_accuracies) if teacher_accuracies else None,
            "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs)}


def markdown(rows, notes, paragraphs):
    """report.md: the table, its footnote, each row's run folders, the notes (title, lines) with lines, paragraphs."""
    def cell(value):  # None: no teacher, or a single run's standard deviation
        return "–" if value is None else f"{value:.2f}"

    def described(r):
        return f"{r['dataset']} | {r['teacher'] or '–'} | {r['student']} | {r['method']} | {r['setting']}"

    lines = ["# Runs of train.py", "", "| dataset | teacher | student | method | setting | runs | last epoch (%) "
             "| best epoch (%) | teacher (%) | wall time (min) |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {described(r)} | {r['runs']} | {cell(r['last_acc_mean'])} ± {cell(r['last_acc_std'])} | "
                     f"{cell(r['best_acc_mean'])} ± {cell(r['best_acc_std'])} | {cell(r['teacher_acc'])} | "
                     f"{r['wall_time_s'] / 60:.1f} |")
    notes = [("Run folders of each row:", [f"{described(r)}: {r['folders']}" for r in rows]), *notes]
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


def labels_of(groups):
    """Each group's name and the flags that set it apart; the flags all groups share (said once, in a title)."""
    shown = [flags(runs[0]["config"]) for runs in groups]
    common = [flag for flag in shown[0] if all(flag in other for other in shown)]
    return [" ".join([name(runs[0]["config"]), *(f for f in group_flags if f not in common)])
            for runs, group_flags in zip(groups, shown)], common


def plot_rows(groups, rows, path):
    """accuracy.png: each row's test accuracy at the last epoch, a dot per run, its mean ± std (summarise's) in black,
    the rows from the top in report.md's order. Returns the (closed) figure."""
    (labels, common), figure = labels_of(groups), plt.figure(figsize=(9, 1.5 + 0.35 * len(groups)))
    for i, (runs, row) in enumerate(zip(groups, rows)):
        plt.plot([r["last_accuracy"] for r in runs], [-i] * len(runs), "o", color=f"C{i % 10}", alpha=0.6)
        plt.errorbar(row["last_acc_mean"], -i, xerr=row["last_acc_std"] or 0, fmt="|", color="black", markersize=14,
                     capsize=4)
    plt.yticks(range(0, -len(groups), -1), [f"{label} (n={len(runs)})" for label, runs in zip(labels, groups)])
    plt.gca().set(xlabel="test accuracy at the last epoch (%): a dot per run, mean ± std in black",
                  title=textwrap.fill("all rows: " + " ".join(common), 100) if common else None)
    plt.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return figure


def plot(groups, path, spectrum_path):
    """FIGURE: the curves into path, the spectrum (where a group has one) into spectrum_path. Returns the (closed)
    figures, the second None without a spectrum: axes [accuracy, loss] and [count where it varies (a flat one tells no
    group apart), effective rank], each line labelled "<group>: <column>" (accuracy: "<group> (n=<runs>)")."""
    curves = [mean_curves(runs) for runs in groups]
    spectrum = any(column in series for series in curves for column in SPECTRUM_COLUMNS)
    counts = [v for series in curves for c in series if c.endswith("sv_over_1pct") for v in series[c]]
    panels = [what for what in SPECTRUM_PANELS if spectrum and (what != "sv_over_1pct" or np.nanstd(counts) > 0)]
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    spectrum_figure, (spectrum_axes,) = (plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
                                         if spectrum else (None, [[]]))
    labels, common = labels_of(groups)
    for i, (runs, series) in enumerate(zip(groups, curves)):
        x = series["epoch"]
        style = {"color": f"C{i % 10}", "marker": "o" if len(x) <= MARKERS_UP_TO else None, "markersize": 3}
        accuracy_axes.plot(x, series["test_acc"], label=f"{labels[i]} (n={len(runs)})", **style)
        accuracy_axes.fill_between(x, series["test_acc_min"], series["test_acc_max"], color=style["color"], alpha=0.2)
        lines = [(loss_axes, column, LOSS_STYLES[column]) for column in LOSS_STYLES
                 if series[column].any()]  # a term the method does not use is logged as zeros
        lines += [(panel, f"{layer}_{what}", LAYER_STYLES[layer]) for panel, what in zip(spectrum_axes, panels)
                  for layer in LAYER_STYLES if f"{layer}_{what}" in series]
        for panel, column, linestyle in lines:
            panel.plot(x, series[column], linestyle=linestyle, label=f"{labels[i]}: {column}", **style)
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy: mean, band min-max over seeds")
    loss_axes.set(xlabel="epoch", ylabel="mean training loss term", title="loss terms (colours as on the left)")
    style_legend(loss_axes, {column.removeprefix("loss_"): style for column, style in LOSS_STYLES.items()})
    for panel, what in zip(spectrum_axes, panels):
        panel.set(xlabel="epoch", ylabel=what, title=f"projector: {SPECTRUM_PANELS[what]}, mean over seeds")
        style_legend(panel, {f"linear layer {layer[-1]}": style for layer, style in LAYER_STYLES.items()})
    shared = "\n" + textwrap.fill("all groups: " + " ".join(common), 130) if common else ""
    for fig, file, what in ((figure, path, "Test accuracy and training loss"),
                            (spectrum_figure, spectrum_path, "The projector's singular values"))[:1 + spectrum]:
        for panel in fig.axes:
            panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        colours = {line.get_color() for line in (accuracy_axes if fig is figure else spectrum_axes[0]).lines}
        shown = [line for line in accuracy_axes.lines if line.get_color() in colours]
        fig.legend(handles=shown, loc="upper center", bbox_to_anchor=(0.5, 0), fontsize="small")  # below: long labels
        fig.suptitle(f"{what} per epoch, {len(groups)} group{'s' * (len(groups) > 1)}, mean over seeds" + shared)
        fig.tight_layout()
        fig.savefig(file, dpi=100, bbox_inches="tight")  # "tight": the figure grows to hold legend and title
        plt.close(fig)
    return figure, spectrum_figure


def plot_against(key, series, path):
    """against-<key>.png: each row's accuracy at the last epoch (mean ± std, a dot per run) against its setting `key`
    (alpha, say), a line per series: [(label, groups)], as --series gives them."""
    figure = plt.figure(figsize=(7, 4.5))
    for i, (label, groups) in enumerate(series):
        points = sorted((group[0]["config"][key], [run["last_accuracy"] for run in group]) for group in groups)
        for x, accuracies in points:
            plt.plot([x] * len(accuracies), accuracies, ".", color=f"C{i}", alpha=0.5)
        plt.errorbar([x for x, _ in points], [statistics.mean(a) for _, a in points], capsize=4, marker="o",
                     yerr=[statistics.stdev(a) if len(a) > 1 else 0 for _, a in points], color=f"C{i}", label=label)
    plt.gca().set(xlabel=key, ylabel="test accuracy at the last epoch (%)", title=f"accuracy against {key}: "
                  "mean ± std over seeds, a dot per run")
    plt.legend()
    plt.grid(alpha=0.3)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return figure


def main(argv=None):
    p = cli.Parser(prog="python report.py", description=__doc__ + FIGURE)
    p.add_argument("runs_dirs", nargs="*", type=Path, default=[Path("runs")], metavar="RUNS_DIR",
                   help="folders searched, at any depth, for run folders (default runs/); their runs are pooled")
    p.add_argument("--out", type=Path, help="folder for report.md, report.csv, figures (default the first RUNS_DIR)")
    p.add_argument("--no-plot", action="store_true", help="skip the figures")
    p.add_argument("--against", metavar="KEY", help="also against-KEY.png: each row's accuracy against its setting KEY "
                   "(a config.json key, alpha say), a line per --series")
    p.add_argument("--series", nargs="+", action="append", metavar=("LABEL", "RUNS_DIR"), default=[],
                   help="a line of --against's figure: its label, then folders of its runs (repeat for each line)")
    args = p.parse_args(argv)
    if bool(args.against) != bool(args.series) or any(len(series) < 2 for series in args.series):
        p.error("--against KEY and --series LABEL RUNS_DIR [RUNS_DIR ...] go together")
    for folder in args.runs_dirs:
        if not folder.is_dir():
            sys.exit(f"error: {folder} is not a folder (train.py writes its runs below runs/ unless told --out)")
    out, (runs, unfinished, problems) = args.out or args.runs_dirs[0], find_runs(args.runs_dirs)
    print("".join(f"skipped {problem}\n" for problem in problems), end="", file=sys.stderr)
    if not runs:
        sys.exit(f"error: no finished run below {', '.join(map(str, args.runs_dirs))} ({len(unfinished)} unfinished, "
                 f"{len(problems)} unreadable; a finished run folder holds config.json and summary.json)")
    series = [(label, group_runs(find_runs(list(map(Path, folders)))[0])) for label, *folders in args.series]
    if empty := [label for label, groups in series if not groups or any(args.against not in g[0]["config"]
                                                                         for g in groups)]:
        sys.exit(f"error: --series {', '.join(empty)}: no finished run, or one without {args.against} in its record")
    groups = group_runs(runs)
    rows = [summarise(group) for group in groups]
    warnings = [f"{name(group[0]['config'])} {row['setting']}: a seed appears twice ({row['folders']})"
                for group, row in zip(groups, rows) if len(set(row["seeds"].split())) < len(group)]
    print("".join(f"warning: {w}\n" for w in warnings), end="", file=sys.stderr)  # a run copied twice, say
    paths = [out / file for file in ("report.md", "report.csv", "curves.png", "spectrum.png", "accuracy.png",
                                     *([f"against-{args.against}.png"] if series else []))]
    table = markdown(rows, [("Unfinished runs, not in the table:", unfinished),
                            ("Skipped runs (a file that cannot be trusted), not in the table:", problems),
                            ("Warnings:", warnings)], [] if args.no_plot else [FIGURE.replace("\n", " ")])
    print(table, end="")
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(table)
        with open(paths[1], "w", newline="") as f:
            (writer := csv.DictWriter(f, fieldnames=CSV_FIELDS)).writeheader()
            writer.writerows(rows)  # full precision; an empty cell where there is no value (None)
        if not args.no_plot:
            plot(groups, paths[2], paths[3])
            plot_rows(groups, rows, paths[4])
        if series:
            plot_against(args.against, series, paths[-1])
    except OSError as error:  # out is a file, or not writable: said by the error, with the path
        sys.exit(f"error: cannot write the report into {out}: {error} (--out FOLDER chooses where it goes)")
    print(f"wrote {', '.join(str(path) for path in paths if path.exists())}")
    return rows


if __name__ == "__main__":
    main()
