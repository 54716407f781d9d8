"""A run's bookkeeping: its folder, its records and its refusals. A reader of the training loop may skip this file.
What a run folder holds, and the six promises kept here ("promise N" below), each with its tests: docs/run-folder.md"""
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
CHECKPOINT_KEYS = ("model", "epoch", "accuracy", "projector", "optimizer", "loader", "rng_cpu", "best", "wall_time_s")
CHOICES = {"student": models.MODEL_NAMES, "teacher": (None, *models.MODEL_NAMES), "method": cli.METHODS,
           "projector": losses.PROJECTORS, "norm": losses.NORMS, "distance": losses.DISTANCES,
           "precision": devices.PRECISIONS, "dataset": data.DATASETS}  # a hand-edited name would fail far from here
DERIVED = ("data_md5", "teacher_file", "teacher_sha256")  # recorded once the data and the teacher are loaded
REPLACED = ("config.json", "log.csv", "last.pt", "best.pt", "summary.json", ".lock")
STOP_SIGNALS = {"SIGINT": 130, "SIGTERM": 143}  # exit status: 128 + the signal's number, as shells report it
WAIT_S = 5  # seconds between looks at a busy run folder
_stops = {"deferred": False, "pending": None, "handled": False, "received": set()}  # the job's stop (promise 5)
_held = {}  # run folder -> os.stat_result of the .lock this process holds there


def add_flags(parser):
    parser.add_argument("--out", help="folder (default runs/<student> or runs/<teacher>-<student>-<method>-seed<k>)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="FOLDER", help="continue from the "
                        "last checkpoint: the run in FOLDER (or --out), else this command's job, wherever it stopped")


def recorded_identity(folder):
    """--student, --teacher and --method as the run in `folder` recorded them: --resume needs nothing else."""
    if not (folder / "last.pt").exists() and not (folder / "config.json").exists():
        sys.exit(f"error: --resume: no run in {folder} (no last.pt, no config.json); to resume a job still training "
                 f"its teacher, add --resume to the job's own command")
    checkpoint = read_checkpoint(folder, None) if (folder / "last.pt").exists() else None
    record, _ = cli.recorded_config(folder, checkpoint, ("student", "teacher", "method"))
    return [str(value) for value in ("--student", record["student"], *(["--teacher", record["teacher"]] if
            record["teacher"] else []), "--method", record["method"])]  # str: argparse names a hand-edited number


def default_folder(config):
    """runs/[<dataset>/][subset<N>/]<teacher>-<student>-<method>-seed<k>, or <student> alone: apart by their data."""
    root = Path("runs") / ("" if config["dataset"] == "cifar100" else config["dataset"])
    root = root / (f"subset{config['train_subset']}" if config.get("train_subset") else "")
    return root / (config["student"] if config["method"] == "none" else
                   f"{config['teacher']}-{config['student']}-{config['method']}-seed{config['seed']}")


def holds_results(out):
    return any((out / name).exists() for name in ("last.pt", "best.pt", "summary.json"))


def check_folder(out, resume, config):
    """Refuse, before anything is written, a run that would overwrite results or another run's records, or not save."""
    if out.exists() and not out.is_dir():
        sys.exit(f"error: the run folder {out} is a file: choose another --out")
    if not resume and holds_results(out):
        sys.exit(f"error: run folder {out} holds results: pass --resume to continue it, or --out to start another")
    if not resume and ((out / "config.json").exists() or (out / "log.csv").exists()):  # an attempt of this run's?
        try:
            record = cli.read_json(out / "config.json")
            other = [key for key in record if key not in (*cli.RESUME_MAY_CHANGE, *DERIVED) and key in config
                     and record[key] != config[key]]
        except ValueError as error:
            other = [str(error)]
        if other:
            sys.exit(f"error: {out} holds another run's records ({', '.join(other[:4])} differ): use another --out")
    folder = next(path for path in (out, *out.parents) if path.exists())  # a new folder: its parent must take it
    try:
        tempfile.TemporaryFile(dir=folder).close()
        fixed = [name for name in REPLACED if (out / name).exists() and not os.access(out / name, os.W_OK)]
        if fixed:
            raise PermissionError(f"{', '.join(fixed)} cannot be replaced: read-only or immutable")
    except OSError as error:
        sys.exit(f"error: cannot write in {folder} ({error}); nothing was written: fix that, or choose another --out")


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
        sys.exit(f"error: cannot take {out / '.lock'} as the run's lock: not a plain file. Remove it, and run again")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"error: {out} is in use by {lock.read().strip() or 'another run'}: wait, or use another --out")
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
        sys.exit(f"error: the run folder {out} was removed while this run wrote into it: it stops, {what}. Run again")
    held, now = _held.get(out), None
    with contextlib.suppress(OSError):
        now = os.stat(out / ".lock", follow_symlinks=False)
    if held is not None and (now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)):
        sys.exit(f"error: {out / '.lock'} was removed or replaced while this process held it (another run may write "
                 f"here): this run stops, {what}. {what_is_intact(out)}")


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
                 f"free on its disk). {what_is_intact(out)}. Free some space or make it writable, then {way_on}")


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
        sys.exit(f"error: cannot resume: {error}: its epochs would be lost. Nothing was changed: restore or move it")
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
    with contextlib.suppress(Exception):  # missing, damaged or older records: not known to be finished
        summary, last = cli.read_json(out / "summary.json", ("last_epoch",)), models.read_checkpoint(out / "last.pt")
        if summary["last_epoch"] == last["epoch"] == last["config"]["epochs"]:
            return summary
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


def epoch_line(row, epochs):
    return ("epoch {epoch:3d}/{epochs}  lr {lr:.4g}  loss {loss_total:.4f} (ce {loss_ce:.4f} feat {loss_feat:.4f} "
            "kd {loss_kd:.4f})  train {train_acc:.2f}%  test {test_acc:.2f}%  {epoch_time_s:.1f}s"
            .format(epochs=epochs, **row) + (f"  {row['images_per_s']:.0f} img/s" if row["images_per_s"] else "")
            + (f" (+{row['warmup_s']:.1f}s warm-up)" if row["warmup_s"] else "")
            + (f"  {row['skipped_steps']} steps skipped (fp16 overflow)" if row["skipped_steps"] else ""))


def written_by_train_py(key, value, current):
    """Whether a recorded value is one train.py writes for `key` (current: this command's, None where it may be)."""
    if key in CHOICES:
        return value in CHOICES[key]
    if current is None or value is None:
        return current is None or key in {k for k, v in cli.LATER_KEYS.items() if v is None} | {"teacher_ckpt"}
    if isinstance(current, list):
        return isinstance(value, list) and all(type(item) is int for item in value)
    return type(value) is type(current) or type(value) is int and type(current) is float


def resumed_config(config, out, given, checkpoint):
    """cli.recorded_config with the `given` flags RESUME_MAY_CHANGE allows; any other that differs refused by name."""
    required = [key for key in config if key not in cli.LATER_KEYS]  # what every version wrote
    saved, note = cli.recorded_config(out, checkpoint, required)
    if note:
        print(note)
    wrong = [f"{key} {value!r}" for key, value in saved.items() if not written_by_train_py(key, value, config.get(key))]
    if wrong:  # a hand-edited record: refused here, not as a traceback where the value is used
        sys.exit(f"error: cannot resume: {out}'s record holds {', '.join(wrong)}, not what train.py writes (edited by "
                 f"hand?). Nothing was changed; restore it, or start a new run")
    differing = sorted(k for k in given - {"resume", "out", *cli.RESUME_MAY_CHANGE} if config[k] != saved.get(k))
    if differing:
        sys.exit(f"error: {out} was run with " + ", ".join(f"{cli.flag(k)} {saved.get(k)}" for k in differing)
                 + "; this command asks for " + ", ".join(f"{cli.flag(k)} {config.get(k)}" for k in differing)
                 + ". On --resume only --epochs may change its length: drop those flags, or use another --out")
    return devices.resumed({**config, **saved, **{key: config[key] for key in given & set(cli.RESUME_MAY_CHANGE)}},
                           saved["device"], out)


def decide(job, args, config, teacher_folder, parser):
    """(run folder, configuration, resume?, summary if done before): one line starts, resumes or says done."""
    out = Path(args.resume if isinstance(args.resume, str) else args.out or default_folder(config))
    if out == teacher_folder:
        sys.exit(f"error: --out {out} is where this job trains its teacher {config['teacher']}: choose another")
    job.update(out=out, teacher_folder=teacher_folder)
    resume = bool(args.resume) and (holds_results(out) or args.from_record)
    if args.resume and not resume:
        first_part = teacher_folder and not finished(teacher_folder) and (teacher_folder / "last.pt").exists()
        print(f"note: nothing was saved in {out} yet: " + (f"the job resumes with its first part, the teacher run "
              f"in {teacher_folder}" if first_part else "it starts"))
    if resume:
        config = resumed_config(config, out, args.given, read_checkpoint(out, None))
        if wrong := cli.out_of_range(parser, config):  # an lr of 1e300 edited into last.pt would fail in SGD
            sys.exit(f"error: cannot resume: {out}'s record holds {wrong}. Nothing was changed: restore it")
        if (summary := finished(out)) and summary["last_epoch"] == config["epochs"]:
            read_checkpoint(out, config["student"])  # its weights checked, as a resume checks them
            print(f"done: {out} finished its {config['epochs']} epochs before; nothing to train (results: "
                  f"{out / 'summary.json'})")
            return out, config, True, summary
        args.device_lines = [devices.line(config) + " (as the run recorded)"]
    return out, config, resume, None
