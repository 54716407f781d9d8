"""A run's bookkeeping: its folder, its records and its refusals. A reader of the training loop may skip this file.

A run folder (default_folder) holds config.json, log.csv (LOG_COLUMNS), last.pt (the published layout {"model",
"epoch", "accuracy"} plus every state a resume needs and its configuration), best.pt, summary.json and .lock. The
promises, each tested (test_failures.py, test_damage.py, test_train.py):
1. One paragraph for every refusal (a bad flag, a damaged file, an unwritable folder, a full disk): what failed, what
   is intact, the way out; no traceback. Flags are checked before anything loads, the folder before anything is
   written; a start that fails before the claim leaves no folder. A new run overwrites no results.
2. One process per folder: a flock on .lock (a plain file, opened without following a link or truncating), naming
   its holder, released however the process dies (Windows has no flock: a warning says so).
3. No half-written file, no write through a link: each file goes to a fresh .tmp created exclusively (a planted link
   is never followed), fsynced, renamed over the old one, then the folder fsynced (as SQLite and PostgreSQL do), so
   a kill or a power loss leaves the old version or the new; a failed write (a full disk, EFBIG) leaves no .tmp.
4. An epoch is saved whole (its log row first, best.pt, last.pt, its line; a stop waits), once its losses and every
   weight and buffer are finite.
5. Ctrl-C and SIGTERM stop a job alike, at once, in either part or between them, repeats ignored: the message, read
   from the folders, names the last complete epoch and the command that resumes, or, with nothing saved, the one
   that starts again; exit status 128 + the signal (130, 143).
6. --resume continues exactly (on the CPU bit for bit) with the configuration last.pt was trained with (config.json
   for an older last.pt; a note says which was trusted), each value of the type train.py writes; a flag that would
   change what it computes (not RESUME_MAY_CHANGE) is refused by name, and so are data whose md5 (of the images and
   labels as loaded) differs from the recorded one. A teacher run is judged by the same record.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

try:
    import fcntl  # POSIX file locks; absent on Windows, where run folders go unlocked
except ImportError:
    fcntl = None

import torch

import cli
import data
import devices
import losses
import models

LOG_COLUMNS = ("epoch", "lr", "loss_ce", "loss_feat", "loss_kd", "loss_total", "train_acc", "test_acc",
               "epoch_time_s", "images_per_s", "warmup_s", "skipped_steps", "proj1_sv_over_1pct",
               "proj1_effective_rank", "proj2_sv_over_1pct", "proj2_effective_rank")
# flags a resumed run may change: --epochs moves its end, the rest decide where and how fast it runs, not what it
# computes (--device has its own check: random streams differ between devices)
RESUME_MAY_CHANGE = ("epochs", "data_dir", "no_download", "device", "compile", "channels_last", "fused_sgd",
                     "cuda_graphs", "teacher_cache", "device_name", "capability")
# what a config.json older than each key means by its absence (precision, tf32: every run then was CPU float32)
LATER_KEYS = {"precision": "fp32", "tf32": False, "cuda_graphs": False, "teacher_cache": False, "teacher_file": None,
              "teacher_sha256": None, "train_subset": None, "device_name": None, "capability": None, "data_md5": None}
CHECKPOINT_KEYS = ("model", "epoch", "accuracy", "projector", "optimizer", "loader", "rng_cpu", "best", "wall_time_s")
CHOICES = {"student": models.MODEL_NAMES, "teacher": (None, *models.MODEL_NAMES), "method": cli.METHODS,
           "projector": losses.PROJECTORS, "norm": losses.NORMS, "distance": losses.DISTANCES,
           "precision": devices.PRECISIONS, "dataset": data.DATASETS}  # a hand-edited name would fail far from here
DERIVED = ("data_md5", "teacher_file", "teacher_sha256")  # recorded once the data and the teacher are loaded
REPLACED = ("config.json", "log.csv", "last.pt", "best.pt", "summary.json", ".lock")
STOP_SIGNALS = {"SIGINT": 130, "SIGTERM": 143}  # exit status: 128 + the signal's number, as shells report it


def flag(key):
    return "--" + key.replace("_", "-")


def add_flags(parser):
    parser.add_argument("--out", help="folder (default runs/<student> or runs/<teacher>-<student>-<method>-seed<k>)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="FOLDER", help="continue from the "
                        "last checkpoint: the run in FOLDER (or --out), else this command's job, wherever it stopped")


def given_flags(parser, argv, args):
    """The flags argv gives, for --resume's comparison (argparse fills in only what a namespace lacks)."""
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**{key: unset for key in vars(args)}))
    return {key for key, value in vars(given).items() if value is not unset}


def recorded_identity(folder):
    """--student, --teacher and --method as the run in `folder` recorded them: --resume needs nothing else."""
    if not (folder / "last.pt").exists() and not (folder / "config.json").exists():
        sys.exit(f"error: --resume: no run in {folder} (no last.pt, no config.json); to continue a job still training "
                 f"its teacher, run the job's own command with --resume")
    checkpoint = read_checkpoint(folder, None) if (folder / "last.pt").exists() else None
    record, _ = recorded_config(folder, checkpoint, ("student", "teacher", "method"))
    return [str(value) for value in ("--student", record["student"], *(["--teacher", record["teacher"]] if
            record["teacher"] else []), "--method", record["method"])]  # str: argparse names a hand-edited number


def default_folder(config):
    """runs/<teacher>-<student>-<method>-seed<k> or runs/<student> alone, below runs/<dataset> for synthetic data and
    runs/.../subset<N> for --train-subset: apart from CIFAR-100's full runs, and from teachers of other data."""
    root = Path("runs") / ("" if config["dataset"] == "cifar100" else config["dataset"])
    root = root / (f"subset{config['train_subset']}" if config.get("train_subset") else "")
    return root / (config["student"] if config["method"] == "none" else
                   f"{config['teacher']}-{config['student']}-{config['method']}-seed{config['seed']}")


def holds_results(out):
    return any((out / name).exists() for name in ("last.pt", "best.pt", "summary.json"))


def check_folder(out, resume, config):
    """Refuse, before anything is loaded or written, a run that would overwrite results or another run's records (a
    config.json of another experiment, a log.csv without one), or could not save its own."""
    if out.exists() and not out.is_dir():
        sys.exit(f"error: the run folder {out} is a file: choose another --out")
    if not resume and holds_results(out):
        sys.exit(f"error: run folder {out} holds results: pass --resume to continue it, or --out to start another")
    if not resume and ((out / "config.json").exists() or (out / "log.csv").exists()):  # an attempt of this run's?
        try:
            record = cli.read_json(out / "config.json")
            other = [key for key in record if key not in (*RESUME_MAY_CHANGE, *DERIVED) and key in config
                     and record[key] != config[key]]
        except ValueError as error:
            other = [str(error)]
        if other:
            sys.exit(f"error: {out} holds the records of another run ({', '.join(other[:4])} differ), no results: "
                     f"choose another --out, or move config.json and log.csv away to start this run there")
    folder = next(path for path in (out, *out.parents) if path.exists())  # a new folder: its parent must take it
    try:
        tempfile.TemporaryFile(dir=folder).close()
        fixed = [name for name in REPLACED if (out / name).exists() and not os.access(out / name, os.W_OK)]
        if fixed:
            raise PermissionError(f"{', '.join(fixed)} cannot be replaced: read-only or immutable")
    except OSError as error:
        sys.exit(f"error: cannot write in {folder} ({error}), so this run could not save its log and checkpoints; "
                 f"nothing was written. Make it writable, or choose another --out")


_stops = {"deferred": False, "pending": None, "handled": False, "received": set()}


def stop(signum, frame=None):  # the job's handler of Ctrl-C and SIGTERM (promise 5): one stop, repeats ignored
    _stops["received"].add(signal.Signals(signum).name)  # a SIGTERM arriving with a Ctrl-C is reported as the stop
    if _stops["deferred"]:
        _stops["pending"] = _stops["pending"] or signum
    elif not _stops["handled"]:
        _stops["handled"] = True
        raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def stops_explained(argv):
    """A stop in the block (a job) exits 128 + the signal, saying what `job`'s folders hold and how to go on."""
    _stops.update(deferred=False, pending=None, handled=False, received=set())
    job, previous = {}, {name: signal.signal(getattr(signal, name), stop) for name in STOP_SIGNALS}
    try:
        yield job
    except KeyboardInterrupt as interruption:
        name = "SIGTERM" if "SIGTERM" in _stops["received"] else interruption.args[0] if interruption.args else "SIGINT"
        out, teacher_folder, epochs = job.get("out"), job.get("teacher_folder"), {}
        for folder in (teacher_folder, out):
            with contextlib.suppress(Exception):  # a missing or damaged last.pt: no epoch to resume from
                epochs[folder] = int(models.read_checkpoint(folder / "last.pt")["epoch"])
        how = "interrupted" if name == "SIGINT" else f"stopped by {name}"
        dropped = {i for i, arg in enumerate(argv) if arg.startswith("--resume")}  # and the FOLDER after a --resume
        dropped |= {i + 1 for i in dropped if argv[i] == "--resume" and argv[i + 1:2 + i] and argv[i + 1][:1] != "-"}
        again = shlex.join(["python", "train.py", *(arg for i, arg in enumerate(argv) if i not in dropped)])
        if out in epochs:
            print(f"{how}: epoch {epochs[out]} is the last complete one ({out / 'last.pt'}); continue with\n"
                  f"  python train.py --resume {shlex.quote(str(out))}", file=sys.stderr)
        elif teacher_folder in epochs and not (teacher_folder / "summary.json").exists():
            print(f"{how} in the job's first part, the teacher run in {teacher_folder}: epoch {epochs[teacher_folder]} "
                  f"is the last complete one; continue the job with\n  {again} --resume", file=sys.stderr)
        else:
            print(f"{how}: no epoch of {out or 'the run'} completed, so nothing can resume; start again with\n"
                  f"  {again}", file=sys.stderr)
        raise SystemExit(STOP_SIGNALS[name]) from None
    finally:  # after a stop, ignored by the system too, or the interpreter's exit would restore the default action;
        # not in stop(): a signal pending then would find no handler ("Signal 15 ignored due to race condition")
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), signal.SIG_IGN if _stops["handled"] else handler)


@contextlib.contextmanager
def claimed(out, resume, config):  # out/.lock, held for the block (promise 2)
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        print(f"warning: no file locks on this platform: nothing stops a second run from writing into {out}")
        yield check_folder(out, resume, config)
        return
    lock = None  # never through a link, never truncated: the file may be another run's lock, or a link planted here
    with contextlib.suppress(OSError):
        lock = open(os.open(out / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644), "r+")
    if lock is None or not stat.S_ISREG(os.fstat(lock.fileno()).st_mode) or os.fstat(lock.fileno()).st_nlink != 1:
        sys.exit(f"error: cannot take {out / '.lock'} as the run's lock: it must be a plain file, not a link (hard or "
                 f"symbolic), folder or pipe. Remove it, and run again")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"error: {out} is in use by {lock.read().strip() or 'another process'}: one run folder takes "
                     f"one process at a time. Wait for it to finish (or stop it), or choose another --out")
        _held[out] = os.fstat(lock.fileno())
        check_held(out, "having written nothing")  # removed or replaced between the open and the flock
        if lock.read().strip():
            print(f"note: {out} was locked by a run that ended without releasing it (killed?); taking it over")
        with writing(out, "the lock's holder"):
            lock.seek(0)
            lock.truncate()
            print(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}",
                  end="", file=lock, flush=True)
        try:
            yield check_folder(out, resume, config)  # again: another process may have written here while this loaded
        finally:
            lock.truncate(0)  # an empty lock file: the run ended cleanly
            fcntl.flock(lock, fcntl.LOCK_UN)
            _held.pop(out, None)


_held = {}  # run folder -> os.stat_result of the .lock this process holds there
WAIT_S = 5  # seconds between looks at a busy run folder


def wait_while_held(out, why):
    """Return once no process holds out/.lock (at once if none does), having said once who holds it and `why`."""
    said = False
    while fcntl is not None and (out / ".lock").is_file():
        with open(out / ".lock") as lock:
            try:  # shared, for an instant: only a running run's exclusive lock makes this fail
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not said:
                    print(f"waiting for the run in {out} ({lock.read().strip() or 'another process'}) to finish: {why}",
                          flush=True)
                said = True
        time.sleep(WAIT_S)


def check_held(out, what):
    """Stop unless out/.lock is still the file this process locked: a lock removed by hand lets a second run in."""
    if not out.is_dir():
        sys.exit(f"error: the run folder {out} was removed while this run wrote into it: it stops, {what}. Start it "
                 f"again")
    try:
        now = os.stat(out / ".lock", follow_symlinks=False)
    except OSError:
        now = None
    held = _held.get(out)
    if held is not None and (now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)):
        sys.exit(f"error: {out / '.lock'} was removed or replaced while this process held it, so another run may be "
                 f"writing into {out}: this run stops, {what}. {what_is_intact(out)}")


@contextlib.contextmanager
def stops_deferred():  # a Ctrl-C or SIGTERM in the block takes effect at its end (promise 4)
    _stops["deferred"] = True
    try:
        yield
    finally:
        _stops["deferred"] = False
    if _stops["pending"]:
        stop(_stops["pending"])


def save_atomically(obj, path):
    """torch.save(obj), or obj as text if it is a str, to a fresh file fsynced and renamed over path (promise 3)."""
    tmp = path.with_name(f"{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # O_EXCL: no link
    try:
        with open(fd, "wb") as f:
            f.write(obj.encode()) if isinstance(obj, str) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data on the disk before the rename points to it
        os.replace(tmp, path)
    except BaseException:  # a full disk, an immutable file, a Ctrl-C: leave no .tmp behind
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: the rename itself on the disk
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(folder)
        os.close(folder)


def write_log(out, rows):  # rows: dicts keyed by LOG_COLUMNS (a column a row lacks stays empty)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([LOG_COLUMNS, *([row.get(key, "") for key in LOG_COLUMNS]
                                                                     for row in rows)])
    save_atomically(text.getvalue(), out / "log.csv")


def logged_rows(out):
    """log.csv's rows (None when missing or empty), each with a whole-number epoch; ValueError for anything else."""
    path = out / "log.csv"
    if not path.exists() or not path.stat().st_size:
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [dict(row, epoch=int(row["epoch"])) for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is unreadable ({type(error).__name__}: {str(error)[:100]})") from None
    return [{key: value for key, value in row.items() if key in LOG_COLUMNS} for row in rows]


def what_is_intact(out):
    notes = []
    for name in ("last.pt", "best.pt"):
        try:
            state = dict(models.read_checkpoint(out / name))  # dict: never a tensor indexed by a string
            resumable = " and holds a full checkpoint: copy it over last.pt to resume from its epoch"
            how = ", weights only" if set(CHECKPOINT_KEYS) - set(state) else resumable if name == "best.pt" else ""
            notes.append(f"{name} (epoch {int(state['epoch'])}, {float(state['accuracy']):.2f}% test) is intact{how}")
        except Exception:  # a damaged file fails in as many ways as it can be damaged
            notes.append(f"{name} is missing or unreadable")
    try:
        rows = logged_rows(out)
        notes.append("log.csv is missing or empty" if rows is None else f"log.csv is intact ({len(rows)} epochs)")
    except ValueError:
        notes.append("log.csv is unreadable")
    return "; ".join(notes)


def read_checkpoint(out, student):
    """out/last.pt, checked whole (and to fit `student`, unless None), or one paragraph naming what is intact."""
    path = out / "last.pt"
    try:
        checkpoint = models.read_checkpoint(path)
        state = checkpoint if isinstance(checkpoint, dict) else {}
        wrong = [key for key in CHECKPOINT_KEYS if key not in state] or [key for key, kind in (("epoch", int), (
            "accuracy", float), ("best", dict), ("wall_time_s", float)) if not isinstance(state[key], kind)]
        if wrong:
            raise ValueError(f"{path} is not a checkpoint of a train.py run ({', '.join(wrong)}: missing or mistyped)")
        if student is not None:
            models.load_state(models.build_model(student), checkpoint["model"], path)
    except (OSError, ValueError) as error:
        fresh = "" if path.exists() or (out / "best.pt").exists() else \
            ". Nothing was saved there yet: run the same command without --resume to start it"
        sys.exit(f"error: cannot resume: {error}. Nothing was changed; {what_is_intact(out)}{fresh}")
    return checkpoint


def check_data(config, out, datasets):
    digest = hashlib.md5()
    for tensor in (*datasets[0], *datasets[1]):
        digest.update(tensor.contiguous().numpy())
    recorded, config["data_md5"] = config.get("data_md5"), digest.hexdigest()
    if recorded not in (None, config["data_md5"]):
        sys.exit(f"error: the data differ from those {out} was trained on (md5 of the images and labels "
                 f"{config['data_md5']}, recorded {recorded}; --data-dir {config['data_dir']}): give the run's data")


def checkpoint(config, epoch, accuracy, best, wall_time_s, student, distill, optimizer, loader, scaler):
    cuda = {"rng_cuda": torch.cuda.get_rng_state()} if config["device"].startswith("cuda") else {}
    return {"model": student.state_dict(), "epoch": epoch, "accuracy": accuracy, "model_name": config["student"],
            "projector": distill.state_dict() if distill is not None else {}, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "loader": loader.state_dict(), "rng_cpu": torch.get_rng_state(),
            "best": best, "wall_time_s": wall_time_s, "config": config, **cuda}


def non_finite(*states):
    tensors = {name: t for state in states for name, t in state.items() if t.is_floating_point()}
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()  # one host sync in all
    return [name for name, ok in zip(tensors, finite) if not ok]


def check_finite(out, epoch, mean_terms, student, distill):
    """Stop before the checkpoint when the mean loss or any weight or buffer (a BatchNorm variance) is not finite."""
    finite = all(map(math.isfinite, mean_terms))
    bad = non_finite(student.state_dict(), distill.state_dict() if distill is not None else {})
    if finite and not bad:
        return
    what = f"non-finite loss in epoch {epoch} (ce, feat, kd, total = {mean_terms})" if not finite else \
        f"non-finite weights or buffers after epoch {epoch} ({len(bad)}: {', '.join(bad[:4])}" \
        f"{', ...' if len(bad) > 4 else ''}), though its mean loss is finite"
    try:
        last = models.read_checkpoint(out / "last.pt")
        kept = f"{out / 'last.pt'} (epoch {last['epoch']}) " + ("holds non-finite values too" if non_finite(
            last["model"], last["projector"]) else "is the last good checkpoint (its values checked)")
    except Exception:  # no checkpoint, or a damaged one
        kept = "it was the first epoch, so no checkpoint was written" if epoch == 1 else \
            f"no readable {out / 'last.pt'} is left"
    sys.exit(f"error: {what}; {kept}. Nothing of this epoch was saved: a smaller --lr or --weight-decay may help")


@contextlib.contextmanager
def writing(out, what):
    """A failed write in the block (a full disk; ValueError: a log.csv damaged meanwhile) stops as promise 1 says."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: torch.save's own on a full disk
        why = getattr(error, "strerror", None) or error
        check_held(out, f"{what} unsaved ({why})")  # the folder, or the lock, removed under it
        saved = (out / "last.pt").exists() or (out / "best.pt").exists()
        way_on = f"continue with: python train.py --resume {shlex.quote(str(out))}" if saved else \
            "run the same command again (no epoch was saved, so it starts afresh)"
        sys.exit(f"error: could not save {what} in {out} ({why}; {shutil.disk_usage(out).free / 2 ** 20:.1f} MB "
                 f"free on its disk). {what_is_intact(out)}. Free some space (or make the folder writable), then "
                 f"{way_on}")


def save_epoch(out, row, checkpoint, is_best):  # in promise 4's order
    check_held(out, f"epoch {row['epoch']} unsaved")
    with writing(out, f"epoch {row['epoch']}"):
        write_log(out, [*(logged_rows(out) or []), row])
        if is_best:
            save_atomically(checkpoint, out / "best.pt")
        save_atomically(checkpoint, out / "last.pt")


def start(out, config, resume, student, distill, optimizer, loader, scaler):
    """A new run's empty log, or a resumed run's states restored (promise 6); then config.json."""
    if not resume:
        with writing(out, "the new run's log and configuration"):
            write_log(out, [])
            save_atomically(json.dumps(config, indent=2), out / "config.json")
        return 1, {"accuracy": -1.0, "epoch": 0}, 0.0, None
    last = read_checkpoint(out, config["student"])
    if last["epoch"] > config["epochs"]:
        sys.exit(f"error: {out} has completed {last['epoch']} epochs; --epochs {config['epochs']} would end them")
    try:
        rows = logged_rows(out)
    except ValueError as error:
        sys.exit(f"error: cannot resume: {error}, and resuming rewrites it: its epochs would be lost. Nothing was "
                 f"changed; put back a good copy, or move it away to resume with a new log")
    try:  # "scaler": older checkpoints ran without loss scaling
        for state, key in ((student, "model"), (distill, "projector"), (optimizer, "optimizer"), (scaler, "scaler"),
                           (loader, "loader")):
            if state is not None and key in last:
                state.load_state_dict(last[key])
        torch.set_rng_state(last["rng_cpu"])
        if "rng_cuda" in last:
            torch.cuda.set_rng_state(last["rng_cuda"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as error:
        sys.exit(f"error: cannot resume: {out / 'last.pt'} does not fit this run's configuration "
                 f"({type(error).__name__}: {str(error)[:300]}). Nothing was changed; {what_is_intact(out)}")
    start_epoch = last["epoch"] + 1
    if rows is None:
        print(f"note: {out / 'log.csv'} is {'empty' if (out / 'log.csv').exists() else 'missing'}: the resumed log "
              f"starts at epoch {start_epoch}")
    with writing(out, "the resumed run's log and configuration"):
        if start_epoch <= config["epochs"]:  # extended: unfinished until its new last epoch
            (out / "summary.json").unlink(missing_ok=True)
        write_log(out, [row for row in rows or [] if row["epoch"] < start_epoch])  # rows after the checkpoint go
        save_atomically(json.dumps(config, indent=2), out / "config.json")
    print(f"resuming {out} at epoch {start_epoch}" if start_epoch <= config["epochs"] else
          f"{out} has completed its {config['epochs']} epochs: nothing to train (give --epochs to extend it)")
    return start_epoch, last["best"], last["wall_time_s"], last


def finished(out):
    """summary.json where it tells the truth, the run finished: its last epoch is last.pt's and the recorded end."""
    try:
        summary, last = cli.read_json(out / "summary.json", ("last_epoch",)), models.read_checkpoint(out / "last.pt")
        if summary["last_epoch"] == last["epoch"] == last["config"]["epochs"]:
            return summary
    except Exception:  # missing, damaged or older records: not known to be finished
        pass
    return None


def finish(out, config, last, best, teacher_accuracy):
    """summary.json, and the closing line with both accuracies the field reports (last and best epoch)."""
    summary = {"student": config["student"], "teacher": config["teacher"], "method": config["method"],
               "last_accuracy": last["accuracy"], "last_epoch": last["epoch"], "best_accuracy": best["accuracy"],
               "best_epoch": best["epoch"], "teacher_accuracy": teacher_accuracy, "wall_time_s": last["wall_time_s"]}
    check_held(out, "its summary.json unwritten")
    with writing(out, "summary.json"):
        save_atomically(json.dumps(summary, indent=2), out / "summary.json")
    print(f"done: {config['student']} test accuracy {last['accuracy']:.2f}% at the last epoch ({last['epoch']}), "
          f"best {best['accuracy']:.2f}% at epoch {best['epoch']}; results in {out}")
    return summary


def shown(loader, stream=None):
    """The loader's batches; on a terminal only (never into a log or CI), one line redrawn each second or so with the
    step, the images per second and the epoch's time left, erased before the epoch's line or whatever ends it."""
    stream = stream or sys.stderr  # sys.stderr as it is now (None where a daemon closed it)
    tty, started, drawn, images = stream is not None and stream.isatty(), time.perf_counter(), 0.0, 0
    try:
        for step, batch in enumerate(loader, 1):
            yield batch
            images += len(batch[1])
            if tty and time.perf_counter() - drawn > 1:
                rate = images / max((drawn := time.perf_counter()) - started, 1e-6)  # on CUDA: the pace of launches
                left = (loader.num_samples - images) / rate
                print(f"\r\033[K  step {step}/{len(loader)}  {rate:.0f} img/s  {left:.0f}s left in this epoch", end="",
                      file=stream, flush=True)  # \033[K: what a longer line before left is erased
    finally:  # an exception or a stop too: its message starts on a clean line
        if tty and drawn:
            print("\r\033[K", end="", file=stream, flush=True)


def epoch_line(row, epochs):
    return ("epoch {epoch:3d}/{epochs}  lr {lr:.4g}  loss {loss_total:.4f} (ce {loss_ce:.4f} feat {loss_feat:.4f} "
            "kd {loss_kd:.4f})  train {train_acc:.2f}%  test {test_acc:.2f}%  {epoch_time_s:.1f}s"
            .format(epochs=epochs, **row) + (f"  {row['images_per_s']:.0f} img/s" if row["images_per_s"] else "")
            + (f" (+{row['warmup_s']:.1f}s warm-up)" if row["warmup_s"] else "")
            + (f"  {row['skipped_steps']} steps skipped (fp16 overflow)" if row["skipped_steps"] else ""))


def recorded_config(out, checkpoint, required):
    """(the configuration the run in `out` was trained with, a note on where it was read, or ""): last.pt's record
    over config.json (deleted or edited by hand?); for an older last.pt, config.json with every `required` key."""
    record = (checkpoint or {}).get("config")
    record = record if isinstance(record, dict) else None
    try:
        saved, problem = cli.read_json(out / "config.json", () if record else required), None
    except ValueError as error:
        saved, problem = None, str(error)
    if record is None:
        if problem:
            last = f"{out / 'last.pt'} (from an older train.py) records no configuration, so the run's recipe " \
                   f"cannot be checked" if checkpoint else f"there is no {out / 'last.pt'}: nothing to resume"
            sys.exit(f"error: cannot resume: {problem}, and {last}. Nothing was changed; restore config.json, or start "
                     f"a new run")
        return {**LATER_KEYS, **saved}, ""
    if problem:
        return record, f"note: {problem}: the configuration recorded in last.pt is used"
    differing = sorted(key for key in set(saved) | set(record) if key not in (*LATER_KEYS, *RESUME_MAY_CHANGE)
                       and saved.get(key) != record.get(key))
    return record, (f"note: {out / 'config.json'} differs from the configuration last.pt was trained with "
                    f"({', '.join(differing)}): last.pt's record is trusted, and config.json is rewritten from it"
                    if differing else "")


def written_by_train_py(key, value, current):
    """Whether a recorded value is one train.py writes for `key` (current: this command's, None where it may be)."""
    if key in CHOICES:
        return value in CHOICES[key]
    if current is None or value is None:
        return current is None or key in {k for k, v in LATER_KEYS.items() if v is None} | {"teacher_ckpt"}
    if isinstance(current, list):
        return isinstance(value, list) and all(type(item) is int for item in value)
    return type(value) is type(current) or type(value) is int and type(current) is float


def resumed_config(config, out, given, checkpoint):
    """recorded_config with the `given` flags RESUME_MAY_CHANGE lets change; any other that differs refused by name."""
    required = [key for key in config if key not in LATER_KEYS]  # what every version wrote
    saved, note = recorded_config(out, checkpoint, required)
    if note:
        print(note)
    wrong = [f"{key} {value!r}" for key, value in saved.items() if not written_by_train_py(key, value, config.get(key))]
    if wrong:  # a hand-edited record: refused here, not as a traceback where the value is used
        sys.exit(f"error: cannot resume: {out}'s record holds {', '.join(wrong)}, not what train.py writes (edited by "
                 f"hand?). Nothing was changed; restore config.json, or start a new run")
    differing = sorted(key for key in given - {"resume", "out", *RESUME_MAY_CHANGE} if config[key] != saved.get(key))
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
