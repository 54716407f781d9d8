"""Where a distillation's teacher comes from. A reader of the training loop may skip this file.

The teacher is, in this order: the file a resumed run recorded (checked by sha256), --teacher-ckpt (this project's
checkpoint or a published ckpt_epoch_240.pth), or the last.pt of this project's own run of it (training_config) in
runs.default_folder, trained first or finished as started; one shorter than the job, or of other data, is refused."""
import sys
from pathlib import Path

import torch

import cli
import data
import models
import runs

MOVE_AWAY = "move that folder away to train a new one, or pass --teacher-ckpt"  # the way out of a teacher run refused


def training_config(config):
    """How a job trains its teacher: the same recipe and data, alone, on cross-entropy, at its architecture's lr."""
    return dict(config, student=config["teacher"], teacher=None, teacher_ckpt=None, method="none", ce_weight=1.0,
                lr=cli.recipe("none", config["teacher"])["lr"], kd_weight=0.0, feat_weight=0.0, teacher_file=None,
                teacher_sha256=None)


def check_checkpoint(config):
    """--teacher-ckpt checked before any data is downloaded or a folder made: a file that loads into --teacher and,
    where it is a train.py run's last.pt, a finished run's (one still training is waited for) of the same data."""
    if not config["teacher_ckpt"] or config.get("teacher_sha256"):  # a resumed run's is checked by its hash
        return
    path = Path(config["teacher_ckpt"])
    runs.wait_while_held(path.parent, f"--teacher-ckpt {path} is its checkpoint")
    try:
        checkpoint = models.load_weights(models.build_model(config["teacher"]), path)
    except (ValueError, OSError) as error:
        sys.exit(f"error: --teacher-ckpt: {error}" + ("; the published CRD teachers are linked in the README "
                 "('Using the published teachers')" if isinstance(error, FileNotFoundError) else ""))
    record = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}  # none in the zoo's files
    if record.get("epochs", checkpoint.get("epoch")) != checkpoint.get("epoch"):
        sys.exit(f"error: --teacher-ckpt {path} is epoch {checkpoint['epoch']} of a {record['epochs']}-epoch run that "
                 f"stopped: finish it first (python train.py --resume {path.parent}), or pass a finished teacher")
    for key in ("dataset", "train_subset"):
        if key in record and record[key] != config[key]:
            print(f"note: the teacher in {path} was trained with {cli.flag(key)} {record[key]}; this run has "
                  f"{config[key]}")


def teacher_file(config, teacher_config, train):
    """The teacher checkpoint (the order above); train(teacher_config, folder, resume) trains this project's own."""
    if config.get("teacher_sha256"):
        path = Path(config["teacher_file"])
        if not path.is_file() or data.digest_of(path, "sha256") != config["teacher_sha256"]:
            sys.exit(f"error: this run distils from the teacher in {path} (sha256 {config['teacher_sha256'][:16]}...), "
                     f"which is {'no longer that file' if path.is_file() else 'gone'}: resuming from another teacher "
                     f"would change the experiment. Put that file back, or start a new run")
        return path
    if config["teacher_ckpt"]:
        return config["teacher_ckpt"]
    folder = runs.default_folder(teacher_config)
    runs.wait_while_held(folder, "it trains the teacher this job reuses")
    try:  # last.pt's record first, as --resume trusts it: a teacher of other data there is not this job's
        checkpoint = models.read_checkpoint(folder / "last.pt") if (folder / "last.pt").exists() else {}
        recorded = checkpoint.get("config") if isinstance(checkpoint, dict) else None
        recorded = recorded or (cli.read_json(folder / "config.json") if (folder / "config.json").exists() else {})
        if (folder / "summary.json").exists():  # its record of the end, which must be readable
            trained = cli.read_json(folder / "summary.json", ("last_epoch",))["last_epoch"]
            if not isinstance(trained, int):
                raise ValueError(f"{folder / 'summary.json'}: last_epoch is {trained!r}, not a number of epochs")
        finished = runs.finished(folder)  # and true: not left behind by a run since extended
    except (OSError, ValueError) as error:
        sys.exit(f"error: the teacher run this job would reuse is damaged: {error}. Move {folder} away to train a "
                 f"new teacher, or pass --teacher-ckpt")
    for key in ("dataset", "train_subset", "data_md5"):  # an older record has no data_md5 (None)
        if recorded and recorded.get(key) != teacher_config.get(key) and (key != "data_md5" or recorded.get(key)):
            sys.exit(f"error: {folder} holds a teacher trained with {cli.flag(key)} {recorded.get(key)}, not this "
                     f"run's {teacher_config.get(key)}: {MOVE_AWAY}")
    if finished and finished["last_epoch"] < config["epochs"]:
        sys.exit(f"error: {folder} holds a teacher trained for {finished['last_epoch']} epochs, fewer than this run's "
                 f"{config['epochs']}: {MOVE_AWAY}")
    if not finished:
        if unfinished := (folder / "last.pt").exists():  # finished as started (this job's device and speed switches)
            given = set(cli.RESUME_MAY_CHANGE) - {"epochs", "device_name", "capability"}
            teacher_config = runs.resumed_config(teacher_config, folder, given, runs.read_checkpoint(folder, None))
            if teacher_config["epochs"] < config["epochs"]:  # stretched, its lr schedule would not be this job's
                sys.exit(f"error: {folder} holds an unfinished teacher run of {teacher_config['epochs']} epochs, "
                         f"fewer than this job's {config['epochs']}: {MOVE_AWAY}")
        print(f"the job, in two parts (no finished teacher {config['teacher']}; --teacher-ckpt takes a published one): "
              f"1. {'finish training' if unfinished else 'train'} {config['teacher']} alone, {teacher_config['epochs']}"
              f" epochs, in {folder}; 2. distil {config['student']} from it for {config['epochs']} epochs")
        train(teacher_config, folder, unfinished)
    return folder / "last.pt"


def own_folder(config, teacher_config):
    """The folder of the teacher run this job trains or reuses; None where the teacher is a file."""
    trains_or_reuses = config["teacher"] and not config["teacher_ckpt"] and not config.get("teacher_sha256")
    return runs.default_folder(teacher_config) if trains_or_reuses else None


def load(config, train):
    """The frozen teacher (teacher_file's; train: its callback) on the run's device, its path and sha256 in config."""
    path = teacher_file(config, training_config(config), train)
    memory_format = torch.channels_last if config["channels_last"] else torch.preserve_format
    teacher = models.build_model(config["teacher"]).to(config["device"], memory_format=memory_format)
    try:
        models.load_weights(teacher, path)
    except (ValueError, OSError) as error:
        sys.exit(f"error: teacher checkpoint: {error}")
    print(f"teacher {config['teacher']} from {path}")
    config.update(teacher_file=str(Path(path).resolve()), teacher_sha256=data.digest_of(path, "sha256"))
    return teacher.eval().requires_grad_(False)

