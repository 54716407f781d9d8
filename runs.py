"""A run's bookkeeping: its folder, its records and its refusals. A reader of the training loop may skip this file.

A run folder (runs/<teacher>-<student>-<method>-seed<k>/, runs/<student>/ for a model trained alone; below
runs/<dataset>/ for synthetic data, runs/.../subset<N>/ for --train-subset) holds config.json (the resolved
configuration), log.csv (a row per epoch: LOG_COLUMNS), last.pt (the newest epoch's checkpoint: the published layout
{"model": state_dict, "epoch", "accuracy"}, which other codebases load, plus the projector, optimizer, loss-scaler,
loader and RNG states and the configuration it was trained with), best.pt (the same, of the best test accuracy),
summary.json (last- and best-epoch accuracy, the teacher's, the wall time) and .lock. The promises, each tested in
test_failures.py or test_train.py:
1. One paragraph for every refusal. A bad flag, a damaged file, a folder that cannot be written, a full disk: each
   stops with one paragraph on stderr (what failed, what is intact, the way out), a non-zero exit, no traceback.
   Flags are checked before anything is loaded; the folder before anything is written (it, or its nearest
   existing parent, must take a new file, and every file the run will replace must be writable); a start that fails
   before the folder is claimed leaves none behind.
2. Nothing is overwritten: a new run refuses a folder holding results, last.pt, best.pt or summary.json (pass
   --resume, or another --out).
3. One process per folder: an exclusive flock on .lock for the run's life, the file naming its holder (process,
   host). The system releases a flock when its process dies, however it dies, so a killed run's folder is free
   again (its stale .lock text earns a note). Windows has no flock: a warning says so.
4. No half-written file: every file is written to a .tmp and renamed over the old one, so a kill at any moment
   leaves the previous version, and a failed write or rename (a full disk, an immutable file) leaves no .tmp.
5. An epoch is saved whole: its log row, best.pt, last.pt and printed line, with Ctrl-C and SIGTERM deferred to the
   end. The row goes first: a kill before last.pt leaves a row that --resume drops, never a checkpoint without its
   row. Before that, the epoch's mean losses and every weight and buffer are checked: a non-finite value stops the
   run, and a checkpoint is called good only once its own values are checked.
6. Ctrl-C and SIGTERM (what schedulers and `timeout` send before SIGKILL) stop a run holding its folder alike, at
   once: the message names the last complete epoch and the command that resumes; the exit status is 128 + the
   signal (130, 143).
7. --resume continues exactly: model, projector, optimizer, loss scaler, epoch, best accuracy, the loader's
   generator and the RNG states come back, so on the CPU a resumed run equals an uninterrupted one bit for bit. The
   configuration is the one last.pt was trained with (config.json for an older last.pt, which has none; a note says
   which file was trusted when they disagree or one is missing). A flag that would change what the run computes is
   refused by name (RESUME_MAY_CHANGE may change). A damaged last.pt is named with what is intact, and a missing one
   with how to resume from a full best.pt.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

try:
    import fcntl  # POSIX file locks; absent on Windows, where run folders go unlocked
except ImportError:
    fcntl = None

import torch

import cli
import devices
import models

LOG_COLUMNS = ("epoch", "lr", "loss_ce", "loss_feat", "loss_kd", "loss_total", "train_acc", "test_acc",
               "epoch_time_s", "images_per_s", "skipped_steps", "proj1_sv_over_1pct", "proj1_effective_rank",
               "proj2_sv_over_1pct", "proj2_effective_rank")
# flags a resumed run may change: --epochs moves its end, the rest decide where and how fast it runs, not what it
# computes (--device has its own check: random streams differ between devices)
RESUME_MAY_CHANGE = ("epochs", "data_dir", "no_download", "device", "compile", "channels_last", "fused_sgd",
                     "cuda_graphs", "teacher_cache", "device_name", "capability")
# what a config.json from before each key existed means by its absence
LATER_KEYS = {"cuda_graphs": False, "teacher_cache": False, "teacher_file": None, "teacher_sha256": None,
              "train_subset": None, "device_name": None, "capability": None}
CHECKPOINT_KEYS = ("model", "epoch", "projector", "optimizer", "loader", "rng_cpu", "best", "wall_time_s")
REPLACED = ("config.json", "log.csv", "last.pt", "best.pt", "summary.json", ".lock")
STOP_SIGNALS = {"SIGINT": 130, "SIGTERM": 143}  # exit status: 128 + the signal's number, as shells report it


def flag(key):
    return "--" + key.replace("_", "-")


# ---- the command line ------------------------------------------------------------------------------------------

def add_flags(parser):
    """--out and --resume: where a run goes, and continuing one."""
    parser.add_argument("--out", help="run folder (default runs/<student> or runs/<teacher>-<student>-<method>-seed<k>)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="FOLDER", help="continue from the "
                        "last checkpoint: the run in FOLDER (or --out), else this command's job, at whichever part it "
                        "stopped")


def given_flags(parser, argv, args):
    """The flags argv gives, for --resume's comparison (argparse fills in only what a namespace lacks)."""
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**{key: unset for key in vars(args)}))
    return {"precision" if key == "bf16" else key for key, value in vars(given).items() if value is not unset}


def recorded_identity(folder):
    """--student, --teacher and --method as the run in `folder` recorded them: --resume needs nothing else."""
    if not (folder / "last.pt").exists() and not (folder / "config.json").exists():
        sys.exit(f"error: --resume: no run in {folder} (no last.pt, no config.json); to continue a job still training "
                 f"its teacher, run the job's own command with --resume")
    checkpoint = read_checkpoint(folder, None) if (folder / "last.pt").exists() else None
    record, _ = recorded_config(folder, checkpoint, ("student", "teacher", "method"))
    return ["--student", record["student"], *(["--teacher", record["teacher"]] if record["teacher"] else []),
            "--method", record["method"]]


# ---- the folder ------------------------------------------------------------------------------------------------

def default_folder(config):
    """The run folder its recipe names (the docstring above): synthetic data and training subsets apart, so they never
    mix with CIFAR-100's full runs, and a distillation never picks up a teacher trained on other data."""
    root = Path("runs") / ("" if config["dataset"] == "cifar100" else config["dataset"])
    root = root / (f"subset{config['train_subset']}" if config.get("train_subset") else "")
    if config["method"] == "none":
        return root / config["student"]
    return root / f"{config['teacher']}-{config['student']}-{config['method']}-seed{config['seed']}"


def check_folder(out, resume):
    """Refuse, before anything is loaded or written, a run that would overwrite results or could not save its own."""
    if out.exists() and not out.is_dir():
        sys.exit(f"error: the run folder {out} is a file: choose another --out")
    if resume and not (out / "last.pt").exists():
        sys.exit(f"error: --resume: no checkpoint {out / 'last.pt'}; {what_is_intact(out)}")
    if not resume and any((out / name).exists() for name in ("last.pt", "best.pt", "summary.json")):
        sys.exit(f"error: run folder {out} holds results: pass --resume to continue it, or --out to start another")
    folder = out
    while not folder.exists():  # a new run folder: its nearest existing parent must take it
        folder = folder.parent
    try:
        tempfile.TemporaryFile(dir=folder).close()
        fixed = [name for name in REPLACED if (out / name).exists() and not os.access(out / name, os.W_OK)]
        if fixed:
            raise PermissionError(f"{', '.join(fixed)} cannot be replaced: read-only or immutable")
    except OSError as error:
        sys.exit(f"error: cannot write in {folder} ({error}), so this run could not save its log and checkpoints; "
                 f"nothing was written. Make it writable, or choose another --out")


@contextlib.contextmanager
def claimed(out, resume, config, then=""):
    """Hold out/.lock for the block (promise 3), check the folder again once held, and turn Ctrl-C and SIGTERM into
    promise 6's message and exit status. `then`: what follows this run in the same job."""
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        with locked(out):
            check_folder(out, resume)  # again: another process may have written here while this one loaded
            yield
    except KeyboardInterrupt as interruption:
        name = interruption.args[0] if interruption.args else "SIGINT"
        print(interrupted(out, config, name, then), file=sys.stderr)
        raise SystemExit(STOP_SIGNALS[name]) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def stop(signum, frame=None):  # SIGTERM's handler: it stops a run as Ctrl-C does (SIGINT raises by itself)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def locked(out):
    if fcntl is None:
        print(f"warning: no file locks on this platform: nothing stops a second run from writing into {out}")
        yield
        return
    with open(out / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            sys.exit(f"error: {out} is in use by {lock.read().strip() or 'another process'}: one run folder takes "
                     f"one process at a time. Wait for it to finish (or stop it), or choose another --out")
        lock.seek(0)
        if lock.read().strip():
            print(f"note: {out} was locked by a run that ended without releasing it (killed?); taking it over")
        lock.seek(0)
        with writing(out, "the lock's holder"):
            lock.truncate()
            lock.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)  # an empty lock file: the run ended cleanly
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def stops_deferred():
    """Ctrl-C or SIGTERM inside the block takes effect at its end (promise 5)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {name: signal.signal(getattr(signal, name), lambda signum, _: received.append(signum))
                for name in STOP_SIGNALS}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    if received:
        stop(received[0])


# ---- the files -------------------------------------------------------------------------------------------------

def save_atomically(obj, path):
    """torch.save(obj), or obj as text if it is a str, to a temporary file renamed over path (promise 4)."""
    tmp = Path(str(path) + ".tmp")
    try:
        tmp.write_text(obj) if isinstance(obj, str) else torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an immutable file, a Ctrl-C: leave no .tmp behind
        tmp.unlink(missing_ok=True)
        raise


def save_json(content, path):
    save_atomically(json.dumps(content, indent=2), path)


def write_log(out, rows):  # rows: dicts keyed by LOG_COLUMNS (a column a row lacks stays empty)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    save_atomically(text.getvalue(), out / "log.csv")


def logged_rows(out):
    """log.csv's rows (None when it is missing), each with a whole-number epoch; ValueError for anything else."""
    path = out / "log.csv"
    if not path.exists():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            row["epoch"] = int(row["epoch"])
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is unreadable ({type(error).__name__}: {str(error)[:100]})") from None
    return [{key: value for key, value in row.items() if key in LOG_COLUMNS} for row in rows]


def what_is_intact(out):
    """For a failure's message: which of the run's files still hold its results."""
    notes = []
    for name in ("last.pt", "best.pt"):
        try:
            state = models.read_checkpoint(out / name)
            full = all(key in state for key in CHECKPOINT_KEYS)
            notes.append(f"{name} (epoch {state['epoch']}, {state['accuracy']:.2f}% test) is intact"
                         + (", weights only" if not full else " and holds a full checkpoint: copy it over last.pt "
                            "to resume from its epoch" if name == "best.pt" else ""))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            notes.append(f"{name} is missing or unreadable")
    try:
        rows = logged_rows(out)
        notes.append("log.csv is missing" if rows is None else f"log.csv is intact ({len(rows)} epochs)")
    except ValueError:
        notes.append("log.csv is unreadable")
    return "; ".join(notes)


def read_checkpoint(out, student):
    """out/last.pt, checked to be a whole checkpoint of a run (of `student`, unless None), or one paragraph naming
    what is intact."""
    path = out / "last.pt"
    try:
        checkpoint = models.read_checkpoint(path)
        missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
        if missing:
            raise ValueError(f"{path} is not a checkpoint of a train.py run (it lacks {', '.join(missing)})")
        if student is not None:
            models.load_state(models.build_model(student), checkpoint["model"], path)
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot resume: {error}. Nothing was changed; {what_is_intact(out)}")
    return checkpoint


def checkpoint(config, epoch, accuracy, best, wall_time_s, student, distill, optimizer, loader, scaler):
    """The epoch's checkpoint: the published layout ({"model", "epoch", "accuracy"}) plus every state a resume needs
    and the configuration it was trained with."""
    state = {"model": student.state_dict(), "epoch": epoch, "accuracy": accuracy, "model_name": config["student"],
             "projector": distill.state_dict() if distill is not None else {}, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "loader": loader.state_dict(), "rng_cpu": torch.get_rng_state(),
             "best": best, "wall_time_s": wall_time_s, "config": config}
    if config["device"].startswith("cuda"):
        state["rng_cuda"] = torch.cuda.get_rng_state()
    return state


def non_finite(*states):
    """Names of the floating-point tensors of the state_dicts `states` holding inf or NaN (one host sync in all)."""
    tensors = {name: t for state in states for name, t in state.items() if t.is_floating_point()}
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    return [name for name, ok in zip(tensors, finite) if not ok]


def check_finite(out, epoch, mean_terms, student, distill):
    """Stop before the epoch's checkpoint is written when its mean loss, or any weight or buffer, is not finite
    (a loss can stay finite while a BatchNorm running variance overflows); name the last checkpoint that is good."""
    bad_terms = not all(map(math.isfinite, mean_terms))
    bad_tensors = non_finite(student.state_dict(), distill.state_dict() if distill is not None else {})
    if not bad_terms and not bad_tensors:
        return
    what = (f"non-finite loss in epoch {epoch} (ce, feat, kd, total = {mean_terms})" if bad_terms else
            f"non-finite weights or buffers after epoch {epoch} ({len(bad_tensors)}: {', '.join(bad_tensors[:4])}"
            f"{', ...' if len(bad_tensors) > 4 else ''}), though its mean loss is finite")
    try:
        last = models.read_checkpoint(out / "last.pt")
        good = not non_finite(last["model"], last["projector"])
        kept = (f"{out / 'last.pt'} (epoch {last['epoch']}) is the last good checkpoint (its values checked)" if good
                else f"{out / 'last.pt'} (epoch {last['epoch']}) holds non-finite values too")
    except (OSError, ValueError, KeyError, TypeError):
        kept = ("it was the first epoch, so no checkpoint was written" if epoch == 1 else
                f"no readable {out / 'last.pt'} is left")
    sys.exit(f"error: {what}; {kept}. Nothing of this epoch was saved: a smaller --lr or --weight-decay may help")


@contextlib.contextmanager
def writing(out, what):
    """A failed write inside the block (a full disk, a folder made read-only meanwhile; ValueError: a log.csv damaged
    while the run trained) stops with one paragraph naming the disk and what is intact (promise 1)."""
    try:
        yield
    except (OSError, ValueError) as error:
        free = shutil.disk_usage(out).free / 2 ** 20
        sys.exit(f"error: could not save {what} in {out} ({getattr(error, 'strerror', None) or error}; {free:.1f} MB "
                 f"free on its disk). {what_is_intact(out)}. Free some space (or make the folder writable) and "
                 f"continue with: python train.py --resume {shlex.quote(str(out))}")


def save_epoch(out, row, checkpoint, is_best):
    """One epoch's log row, best.pt (when it is the best) and last.pt, in that order (promise 5)."""
    with writing(out, f"epoch {row['epoch']}"):
        write_log(out, [*(logged_rows(out) or []), row])
        if is_best:
            save_atomically(checkpoint, out / "best.pt")
        save_atomically(checkpoint, out / "last.pt")


def start(out, config, resume, student, distill, optimizer, loader, scaler):
    """A new run's empty log, or a resumed run's states restored (promise 7); then config.json. Returns the epoch to
    start from, the best so far, the wall time already spent and the last checkpoint (None for a new run)."""
    if not resume:
        with writing(out, "the new run's log and configuration"):
            write_log(out, [])
            save_json(config, out / "config.json")
        return 1, {"accuracy": -1.0, "epoch": 0}, 0.0, None
    last = read_checkpoint(out, config["student"])
    if last["epoch"] > config["epochs"]:
        sys.exit(f"error: {out} has completed {last['epoch']} epochs; --epochs {config['epochs']} would end it "
                 f"before them")
    try:
        rows = logged_rows(out)
    except ValueError as error:
        sys.exit(f"error: cannot resume: {error}, and resuming rewrites it: its epochs would be lost. Nothing was "
                 f"changed; put back a good copy, or move it away to resume with a log that starts at epoch "
                 f"{last['epoch'] + 1}")
    try:
        student.load_state_dict(last["model"])
        if distill is not None:
            distill.load_state_dict(last["projector"])
        optimizer.load_state_dict(last["optimizer"])
        if "scaler" in last:  # older checkpoints ran without loss scaling
            scaler.load_state_dict(last["scaler"])
        loader.load_state_dict(last["loader"])
        torch.set_rng_state(last["rng_cpu"])
        if "rng_cuda" in last:
            torch.cuda.set_rng_state(last["rng_cuda"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as error:
        sys.exit(f"error: cannot resume: {out / 'last.pt'} does not fit this run's configuration "
                 f"({type(error).__name__}: {str(error)[:300]}). Nothing was changed; {what_is_intact(out)}")
    start_epoch = last["epoch"] + 1
    if rows is None:
        print(f"note: {out / 'log.csv'} is missing: the resumed log starts at epoch {start_epoch}")
    with writing(out, "the resumed run's log and configuration"):
        write_log(out, [row for row in rows or [] if row["epoch"] < start_epoch])  # rows after the checkpoint go
        save_json(config, out / "config.json")
    print(f"resuming {out} at epoch {start_epoch}" if start_epoch <= config["epochs"] else
          f"{out} has completed its {config['epochs']} epochs: nothing to train (give --epochs to extend it)")
    return start_epoch, last["best"], last["wall_time_s"], last


def finish(out, config, last, best, teacher_accuracy):
    """summary.json, and the closing line with both accuracies the field reports (last and best epoch)."""
    summary = {"student": config["student"], "teacher": config["teacher"], "method": config["method"],
               "last_accuracy": last["accuracy"], "last_epoch": last["epoch"],
               "best_accuracy": best["accuracy"], "best_epoch": best["epoch"],
               "teacher_accuracy": teacher_accuracy, "wall_time_s": last["wall_time_s"]}
    with writing(out, "summary.json"):
        save_json(summary, out / "summary.json")
    print(f"done: {config['student']} test accuracy {summary['last_accuracy']:.2f}% at the last epoch "
          f"({summary['last_epoch']}), best {summary['best_accuracy']:.2f}% at epoch {summary['best_epoch']}; "
          f"results in {out}")
    return summary


def epoch_line(row, epochs):
    skipped = f"  {row['skipped_steps']} steps skipped (fp16 overflow)" if row["skipped_steps"] else ""
    return (f"epoch {row['epoch']:3d}/{epochs}  lr {row['lr']:.4g}  loss {row['loss_total']:.4f} (ce {row['loss_ce']:.4f} "
            f"feat {row['loss_feat']:.4f} kd {row['loss_kd']:.4f})  train {row['train_acc']:.2f}%  "
            f"test {row['test_acc']:.2f}%  {row['epoch_time_s']:.1f}s  {row['images_per_s']:.0f} img/s{skipped}")


# ---- the configuration and the teacher -------------------------------------------------------------------------

def recorded_config(out, checkpoint, required):
    """(the configuration the run in `out` was trained with, a note on where it was read, or ""). last.pt's own
    record is trusted over config.json, which can be deleted or edited by hand; an older last.pt has none, and then
    config.json must hold every `required` key."""
    record = (checkpoint or {}).get("config")
    try:
        saved, problem = cli.read_json(out / "config.json", () if record else required), None
    except ValueError as error:
        saved, problem = None, str(error)
    if record is None:
        if problem:
            sys.exit(f"error: cannot resume: {problem}, and {out / 'last.pt'} (from an older train.py) records no "
                     f"configuration, so the run's recipe cannot be checked. Nothing was changed; restore "
                     f"config.json, or start a new run")
        return {**LATER_KEYS, **saved}, ""
    if problem:
        return record, f"note: {problem}: the configuration recorded in last.pt is used"
    differing = sorted(key for key in set(saved) | set(record) if key not in (*LATER_KEYS, *RESUME_MAY_CHANGE)
                       and saved.get(key) != record.get(key))
    if differing:
        return record, (f"note: {out / 'config.json'} differs from the configuration last.pt was trained with "
                        f"({', '.join(differing)}): last.pt's record is trusted, and config.json is rewritten from it")
    return record, ""


def resumed_config(config, out, given, checkpoint):
    """The configuration the run in `out` was trained with (recorded_config), with the flags in `given` (those on
    the command line) that may change (RESUME_MAY_CHANGE); any other given flag that differs is refused by name."""
    required = [key for key in config if key not in LATER_KEYS and key != "precision"]  # what every version wrote
    saved, note = recorded_config(out, checkpoint, required)
    if note:
        print(note)
    if "precision" not in saved:  # before --precision, bf16 autocast was a switch
        saved["precision"] = "bf16" if saved.pop("bf16", False) else "fp32"
    differing = [key for key in sorted(given - {"resume", "out", *RESUME_MAY_CHANGE})
                 if config.get(key) != saved.get(key)]
    if differing:
        sys.exit(f"error: {out} was run with " + ", ".join(f"{flag(k)} {saved.get(k)}" for k in differing)
                 + "; this command asks for " + ", ".join(f"{flag(k)} {config.get(k)}" for k in differing)
                 + ". A resumed run keeps its recorded configuration, and only --epochs may change its length: "
                   "drop those flags to continue it, or give another --out to start a new run")
    if "device" in given and torch.device(config["device"]).type != torch.device(saved["device"]).type:
        sys.exit(f"error: {out} ran on {saved['device']}; it can only resume there")
    if saved["device"].startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: {out} ran on {saved['device']}, and this machine has no CUDA device to resume it on")
    config = {**config, **saved, **{key: config[key] for key in given & set(RESUME_MAY_CHANGE)}}
    devices.check(config["device"])  # a recorded cuda:1 on a one-GPU machine: --device cuda:0 resumes it there
    gpu = config["device"].startswith("cuda")  # the device this resume runs on, maybe not the one the run began on
    config.update(device_name=torch.cuda.get_device_name(config["device"]) if gpu else "cpu",
                  capability="%d.%d" % torch.cuda.get_device_capability(config["device"]) if gpu else None)
    if config["cuda_graphs"] and not config["compile"]:  # graphs replay the compiled step
        if "cuda_graphs" in given:
            sys.exit("error: --cuda-graphs needs --compile (it replays the compiled step)")
        config["cuda_graphs"] = False
    return config


def interrupted(out, config, signal_name="SIGINT", then=""):
    """The message of a run stopped by Ctrl-C or SIGTERM: the last complete epoch, and the command that continues."""
    stopped = "interrupted" if signal_name == "SIGINT" else f"stopped by {signal_name}"
    try:
        epoch = models.read_checkpoint(out / "last.pt")["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{stopped} in the first epoch: no epoch completed, so {out} has nothing to resume; start again"
    job = f"; or run the command that started this job with --resume: it resumes this run, then {then} follows" \
        if then else ""
    return (f"{stopped}: epoch {epoch} is the last complete one ({out / 'last.pt'}); continue with\n"
            f"  python train.py --resume {shlex.quote(str(out))}{job}")


def describe(config, out, defaults):
    """The resolved configuration for the terminal: what differs from `defaults` first (config.json has it all)."""
    pairs = {"changed": [], "default": []}
    for key, value in config.items():
        if key not in ("student", "teacher", "method"):
            pairs["default" if defaults.get(key) == value else "changed"].append(f"{key}={value}")
    pair = f"{config['teacher']} -> {config['student']}" if config["teacher"] else config["student"]
    return "\n".join([f"run: {pair}, method {config['method']}, into {out}"] + [
        textwrap.fill(" ".join(items), 116, initial_indent=f"  {label}: ", subsequent_indent="    ")
        for label, items in (("not the defaults", pairs["changed"]), ("defaults", pairs["default"])) if items])
