"""Summarise train.py's runs: accuracy over seeds as a Markdown table, and training curves.

    python report.py                                 # every run below runs/: runs/report.md, report.csv, curves.png
    python report.py runs/ other/runs/ --out results/   # pool several folders (seeds run on different machines)

Runs whose configurations differ only in the seed (or in where and how fast they ran) make one row: mean and sample
standard deviation of the test accuracy at the last epoch and at the best epoch.
"""
import argparse
import csv
import json
import math
import statistics
import sys
import textwrap
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only: no display is needed, or present on a training machine
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np

# Keys of config.json that never split a group: the seed (what a row averages over), where the data and the teacher's
# file live (the teacher is told apart by its file's sha256), and the speed switches, which change at most the order
# of float32 operations (the device's random streams differ, as another seed's would; --teacher-cache gives
# bit-identical results). bf16 is not one of them:
# autocast rounds every activation to 8 bits of mantissa, by an effect on accuracy nobody here has measured, and the
# paper's numbers are float32, so bf16 and float32 runs stay in separate rows.
NOT_THE_EXPERIMENT = ("seed", "data_dir", "no_download", "device", "compile", "channels_last", "fused_sgd",
                      "cuda_graphs", "teacher_cache", "teacher_file")
TEACHER_IDENTITY = "teacher_sha256"  # train.py records the teacher file's hash; runs before it have only the path
COLUMNS_OF_THE_TABLE = ("student", "teacher", "method")  # shown in columns of their own, not among the flags
SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # train.py's lr-0.01 students
LOSS_STYLES = {"loss_ce": "-", "loss_feat": "--", "loss_kd": ":"}
CSV_FIELDS = ("teacher", "student", "method", "setting", "runs", "seeds", "last_acc_mean", "last_acc_std",
              "best_acc_mean", "best_acc_std", "teacher_acc", "wall_time_s", "folders")
FOOTER = """Top-1 test accuracy (%): mean ± sample standard deviation (ddof=1) over a row's runs, which differ only in
--seed and in what does not change the experiment (device, data folder, speed switches other than bf16); "–" where
a row has a single run. Last epoch: the accuracy after the final epoch (what RepDistiller and CRD report). Best
epoch: the highest test accuracy over all epochs (what DKD and mdistiller report; picked on the test set, so it
flatters). Setting: the flags where a row departs from the paper's recipe. Wall time: mean per run."""


class BadRun(Exception):
    """A run folder whose files cannot be trusted: it is reported and left out."""


def recipe_defaults(config):
    """What config.json holds for a flag not given (test_report.py checks this against train.resolve_config).

    A key that an older config.json lacks takes this value, so old and new runs of one experiment group together."""
    kd, srd = config["method"] == "kd", config["method"] == "srd"
    return {"teacher": None, "teacher_ckpt": None, "feat_weight": 2.0 if srd else 0.0,
            "kd_weight": 0.9 if kd else 0.0, "ce_weight": 0.1 if kd else 1.0, "temperature": 4.0,
            "projector": "mlp", "hidden_dim": 1024, "norm": "bn", "distance": "logsum", "alpha": 4.0,
            "epochs": 240, "milestones": [150, 180, 210], "batch_size": 64, "weight_decay": 5e-4,
            "lr": 0.01 if config["student"] in SMALL_LR_STUDENTS else 0.05, "dataset": "cifar100",
            "bf16": False}  # the paper's arithmetic; train.py turns bf16 on by default on CUDA, for speed


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
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRun(f"{path}: unreadable ({error})")
    if not isinstance(content, dict):
        raise BadRun(f"{path}: not a JSON object")
    missing = [key for key in required if key not in content]
    if missing:
        raise BadRun(f"{path}: no {', '.join(missing)}")
    return content


def read_log(path):
    """log.csv's curves as {column: [one value per epoch]}; anything but whole numeric rows from epoch 1 is bad."""
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
    return curves


def find_runs(runs_dirs):
    """Every run folder (one holding config.json) below runs_dirs -> finished runs, unfinished runs, problems."""
    finished, unfinished, problems = [], [], []
    for config_path in sorted(path for folder in runs_dirs for path in folder.rglob("config.json")):
        folder = config_path.parent
        try:
            config = read_json(config_path, ("student", "method"))
            config = {**recipe_defaults(config), **config}
            logged = (folder / "log.csv").exists()
            if not (folder / "summary.json").exists():
                epochs = len(read_log(folder / "log.csv")["epoch"]) if logged else 0
                unfinished.append(f"{folder}: {epochs} of {config['epochs']} epochs logged")
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
    if len(set(row["seeds"].split())) < len(runs):  # say, one run copied into two of the RUNS_DIRs
        print(f"warning: {name(config)} {setting(config)}: a seed appears twice ({row['folders']})", file=sys.stderr)
    return row


def markdown(rows, unfinished):
    def accuracy(mean, std):
        return f"{mean:.2f} ± " + ("–" if std is None else f"{std:.2f}")

    lines = ["| teacher | student | method | setting | runs | last epoch (%) | best epoch (%) | teacher (%) "
             "| wall time (min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        teacher_acc = "–" if r["teacher_acc"] is None else f"{r['teacher_acc']:.2f}"
        lines.append(f"| {r['teacher'] or '–'} | {r['student']} | {r['method']} | {r['setting']} | {r['runs']} | "
                     f"{accuracy(r['last_acc_mean'], r['last_acc_std'])} | "
                     f"{accuracy(r['best_acc_mean'], r['best_acc_std'])} | {teacher_acc} | "
                     f"{r['wall_time_s'] / 60:.1f} |")
    lines += ["", FOOTER.replace("\n", " ")]
    if unfinished:
        lines += ["", "Unfinished runs, not in the table:", *[f"- {line}" for line in unfinished]]
    return "\n".join(lines) + "\n"


def plot(groups, path):
    """Test accuracy per epoch (mean line, min-max band over seeds) and each loss term's mean, one colour a group."""
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    shown = [flags(runs[0]["config"]) for runs in groups]
    common = [flag for flag in shown[0] if all(flag in other for other in shown)]  # said once, in the title
    labels = [" ".join([name(runs[0]["config"]), *(f for f in group_flags if f not in common)])
              for runs, group_flags in zip(groups, shown)]
    for i, runs in enumerate(groups):
        colour, epochs = f"C{i % 10}", min(len(r["curves"]["epoch"]) for r in runs)
        x = np.arange(1, epochs + 1)
        accuracies = np.array([r["curves"]["test_acc"][:epochs] for r in runs])
        accuracy_axes.plot(x, accuracies.mean(0), color=colour, label=f"{labels[i]} (n={len(runs)})")
        accuracy_axes.fill_between(x, accuracies.min(0), accuracies.max(0), color=colour, alpha=0.2)
        for column, style in LOSS_STYLES.items():
            losses = np.array([r["curves"][column][:epochs] for r in runs]).mean(0)
            if losses.any():  # a term the method does not use is logged as zeros
                loss_axes.plot(x, losses, color=colour, linestyle=style)
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy: mean, band min-max over seeds")
    loss_axes.set(xlabel="epoch", ylabel="mean training loss term", title="loss terms (colours as on the left)")
    loss_axes.legend(handles=[plt.Line2D([], [], color="black", linestyle=style, label=column.removeprefix("loss_"))
                              for column, style in LOSS_STYLES.items()])
    for axes in (accuracy_axes, loss_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.legend(loc="upper center", bbox_to_anchor=(0.5, 0), fontsize="small")  # below: labels can be long
    figure.suptitle(textwrap.fill(f"{' vs '.join(labels)}; all runs: {' '.join(common) or 'the recipe'}", 130))
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the figure grows to hold legend and title
    plt.close(figure)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs_dirs", nargs="*", type=Path, default=[Path("runs")], metavar="RUNS_DIR",
                   help="folders searched, at any depth, for run folders (default runs/); their runs are pooled")
    p.add_argument("--out", type=Path, help="folder for report.md, report.csv, curves.png (default the first RUNS_DIR)")
    p.add_argument("--no-plot", action="store_true", help="skip curves.png")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for folder in args.runs_dirs:
        if not folder.is_dir():
            sys.exit(f"error: {folder} is not a folder (train.py writes its runs below runs/ unless told --out)")
    runs, unfinished, problems = find_runs(args.runs_dirs)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    if not runs:
        sys.exit(f"error: no finished run below {', '.join(map(str, args.runs_dirs))} ({len(unfinished)} "
                 f"unfinished, {len(problems)} unreadable; a finished run folder holds config.json and summary.json)")

    by_experiment = {}
    # by seed (right-justified text: numeric order for train.py's integers, and no crash on a hand-edited one)
    for run in sorted(runs, key=lambda r: (str(r["config"].get("seed")).rjust(20), str(r["folder"]))):
        by_experiment.setdefault(experiment(run["config"]), []).append(run)
    groups = sorted(by_experiment.values(), key=lambda g: [str(g[0]["config"][key] or "") for key in
                                                           ("dataset", "student", "teacher", "method")])
    rows = [summarise(group) for group in groups]
    table = markdown(rows, unfinished)
    print(table, end="")

    out = args.out or args.runs_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(table)
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)  # full precision; an empty cell where there is no value (None)
    if not args.no_plot:
        plot(groups, out / "curves.png")
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'}" + ("" if args.no_plot else f", {out / 'curves.png'}"))
    return rows


if __name__ == "__main__":
    main()
