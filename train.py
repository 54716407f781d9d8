"""Distil a CIFAR-100 teacher into a student with Miles & Mikolajczyk's projector loss, or with KD, or train alone.

    python train.py --teacher resnet32x4 --student resnet8x4      # the paper's method (SRD), 240 epochs
    python train.py --student resnet32x4                          # a model alone, with cross-entropy (how teachers are made)

The recipe is CRD's (Tian, Krishnan & Isola, ICLR 2020), which the paper follows on CIFAR-100. Each run writes
config.json, log.csv, last.pt, best.pt and summary.json into its own folder, which one process holds at a time;
--resume continues a run exactly where its last checkpoint left it, and Ctrl-C stops it cleanly.
"""
import argparse
import contextlib
import csv
import json
import math
import os
import shlex
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
import torch.nn.functional as F

import data
import losses
import models

SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # CRD trains these with lr 0.01
METHODS = ("srd", "kd", "none")
LOG_COLUMNS = ("epoch", "lr", "loss_ce", "loss_feat", "loss_kd", "loss_total", "train_acc", "test_acc",
               "epoch_time_s", "images_per_s")
FAKE_SIZES = {"fake": (2000, 500),  # train, test images: seconds per epoch on a CPU
              "fake-full": (50_000, 10_000)}  # CIFAR-100's sizes: epoch times as real data would give
# flags a resumed run may change: --epochs moves its end, the rest decide where and how fast it runs, not what it
# computes (--device has its own check: random streams differ between devices)
RESUME_MAY_CHANGE = ("epochs", "data_dir", "no_download", "device", "compile", "channels_last", "fused_sgd",
                     "cuda_graphs", "teacher_cache")
CHECKPOINT_KEYS = ("model", "epoch", "projector", "optimizer", "loader", "rng_cpu", "best", "wall_time_s")
CACHE_BATCH = 2048  # images per teacher forward pass while filling the teacher cache
CACHE_HEADROOM = 2 * 2 ** 30  # bytes the teacher cache leaves free for training itself


def finite_float(text):
    """argparse type: a float that is neither nan nor infinite (they pass every "> 0" check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def flag(key):
    return "--" + key.replace("_", "-")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, choices=models.MODEL_NAMES, metavar="NAME",
                   help="model to train: " + ", ".join(models.MODEL_NAMES))
    p.add_argument("--teacher", choices=models.MODEL_NAMES, metavar="NAME", help="teacher to distil from (same names)")
    p.add_argument("--teacher-ckpt", help="teacher weights (this project's or the published ckpt_epoch_240.pth)")
    p.add_argument("--method", choices=METHODS, help="srd: the paper's loss (default with a teacher); kd: Hinton KD; "
                   "none: cross-entropy alone (default without a teacher)")
    p.add_argument("--feat-weight", type=finite_float, default=2.0, help="weight of the feature distance D (srd)")
    p.add_argument("--kd-weight", type=finite_float, help="weight of the KD term (default 0.9 for kd, 0 otherwise)")
    p.add_argument("--ce-weight", type=finite_float, help="weight of cross-entropy (default 0.1 for kd, 1 otherwise)")
    p.add_argument("--temperature", type=finite_float, default=4.0, help="KD temperature")
    p.add_argument("--projector", choices=losses.PROJECTORS, default="mlp", help="projector on the student feature")
    p.add_argument("--hidden-dim", type=int, default=1024, help="hidden width of the mlp projector")
    p.add_argument("--norm", choices=losses.NORMS, default="bn", help="normalisation of both features")
    p.add_argument("--distance", choices=losses.DISTANCES, default="logsum", help="distance between them")
    p.add_argument("--alpha", type=finite_float, default=4.0, help="exponent of the logsum / pow distance")
    p.add_argument("--epochs", type=int, help="epochs (default 240; with --resume: where the run ends, not before "
                   "its last complete epoch)")
    p.add_argument("--milestones", type=int, nargs="*", default=[150, 180, 210], help="epochs where lr drops x0.1")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=finite_float, help="initial lr (default 0.05, 0.01 for MobileNetV2/ShuffleV1/ShuffleV2)")
    p.add_argument("--weight-decay", type=finite_float, default=5e-4, help="SGD weight decay, on every parameter")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    p.add_argument("--dataset", choices=("cifar100", *FAKE_SIZES), default="cifar100",
                   help="fake: a small learnable synthetic set, for offline smoke runs; fake-full: the same at "
                   "CIFAR-100's size, for timing runs where CIFAR-100 cannot be reached")
    p.add_argument("--data-dir", default="data", help="folder holding (or receiving) cifar-100-python/")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-100")
    p.add_argument("--out", help="run folder (default runs/<student> or runs/<teacher>-<student>-<method>-seed<k>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    speed = p.add_argument_group("speed (each on by default on CUDA, off on CPU)")
    for name, what in (("bf16", "bf16 autocast of the networks (losses stay float32)"),
                       ("channels-last", "channels_last memory format"),
                       ("compile", "torch.compile of the training step"),
                       ("fused-sgd", "the SGD update in one fused kernel (else foreach)")):
        speed.add_argument("--" + name, action=argparse.BooleanOptionalAction, help=what)
    speed.add_argument("--cuda-graphs", action="store_true", help="replay the compiled step as CUDA graphs "
                       "(torch.compile mode reduce-overhead); off by default: whether it pays off is unmeasured")
    speed.add_argument("--teacher-cache", action="store_true", help="run the teacher once on all 162 views of every "
                       "training image, then look its outputs up (exact); off by default: its gain is unmeasured")
    args = p.parse_args(argv)
    # which flags the command line gave: argparse fills in a default only where the namespace lacks the attribute
    unset = object()
    given = p.parse_args(argv, argparse.Namespace(**{key: unset for key in vars(args)}))
    args.given = {key for key, value in vars(given).items() if value is not unset}

    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (BatchNorm needs batch statistics)")
    for key in ("epochs", "lr", "temperature", "alpha", "hidden_dim", "milestones"):
        values = getattr(args, key)
        if any(v is not None and v <= 0 for v in (values if isinstance(values, list) else [values])):
            p.error(f"{flag(key)} must be positive")
    for key in ("feat_weight", "kd_weight", "ce_weight", "weight_decay"):
        if getattr(args, key) is not None and getattr(args, key) < 0:
            p.error(f"{flag(key)} must be zero or positive")
    if args.teacher_ckpt and not args.teacher:
        p.error("--teacher-ckpt needs --teacher NAME (the architecture to load it into)")
    args.method = args.method or ("srd" if args.teacher else "none")
    if args.teacher and args.method == "none":
        p.error("--method none trains the student alone: drop --teacher")
    if not args.teacher and args.method != "none":
        p.error(f"--method {args.method} needs --teacher")
    if args.teacher_cache and not args.teacher:
        p.error("--teacher-cache stores a teacher's outputs: it needs --teacher")
    return args


def default_lr(student):
    return 0.01 if student in SMALL_LR_STUDENTS else 0.05


def check_device(device):
    """Refuse a --device this machine does not have, before anything is loaded."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        sys.exit(f"error: --device {device!r} is not a device name torch knows: use cpu, cuda, or cuda:N")
    if parsed.type not in ("cpu", "cuda"):
        sys.exit(f"error: --device {device}: this project trains on cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {device}, but torch {torch.__version__} sees no CUDA device here: drop --device to "
                 f"train on the CPU, or install a CUDA build of torch on a machine with an NVIDIA GPU")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        sys.exit(f"error: --device {device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")


def resolve_config(args):
    """Everything a run depends on, as saved in config.json (the defaults are the paper's recipe)."""
    if args.device:
        check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    kd = args.method == "kd"
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "given")}
    config.update(
        epochs=args.epochs or 240,
        lr=args.lr or default_lr(args.student),
        ce_weight=args.ce_weight if args.ce_weight is not None else (0.1 if kd else 1.0),
        kd_weight=args.kd_weight if args.kd_weight is not None else (0.9 if kd else 0.0),
        feat_weight=args.feat_weight if args.method == "srd" else 0.0,
        device=device,
        teacher_ckpt=str(Path(args.teacher_ckpt).resolve()) if args.teacher_ckpt else None,  # resumable from anywhere
        bf16=on_cuda if args.bf16 is None else args.bf16,
        channels_last=on_cuda if args.channels_last is None else args.channels_last,
        compile=on_cuda if args.compile is None else args.compile,
        fused_sgd=on_cuda if args.fused_sgd is None else args.fused_sgd,
    )
    if config["cuda_graphs"] and not (on_cuda and config["compile"]):
        sys.exit("error: --cuda-graphs needs a CUDA device and --compile (it replays the compiled step)")
    return config


def teacher_training_config(config):
    """The same recipe and data, with the teacher trained alone on cross-entropy."""
    return dict(config, student=config["teacher"], teacher=None, teacher_ckpt=None, method="none",
                lr=default_lr(config["teacher"]), ce_weight=1.0, kd_weight=0.0, feat_weight=0.0, teacher_cache=False,
                teacher_file=None, teacher_sha256=None)


def default_run_folder(config):
    root = Path("runs") / ("" if config["dataset"] == "cifar100" else config["dataset"])
    if config["method"] == "none":
        return root / config["student"]
    return root / f"{config['teacher']}-{config['student']}-{config['method']}-seed{config['seed']}"


def load_datasets(config):
    """((train images, labels), (test images, labels)) as uint8 / int64 CPU tensors, with a line saying what came."""
    if config["dataset"] in FAKE_SIZES:
        train_size, test_size = FAKE_SIZES[config["dataset"]]
        datasets = data.fake_cifar100(train_size, seed=0), data.fake_cifar100(test_size, seed=1)
        source = f"synthetic (--dataset {config['dataset']})"
    else:
        try:
            datasets = tuple(data.load_cifar100(config["data_dir"], train, download=not config["no_download"])
                             for train in (True, False))
        except (FileNotFoundError, data.DataError) as error:
            sys.exit(f"error: {error}")
        source = f"CIFAR-100 from {Path(config['data_dir']) / 'cifar-100-python'}"
    print(f"data: {source}, {len(datasets[0][1]):,} training and {len(datasets[1][1]):,} test images")
    return datasets


def lr_at(config, epoch):
    """Step schedule: x0.1 at each milestone (epochs count from 1, so epoch 151 is the first at lr/10)."""
    return config["lr"] * 0.1 ** sum(epoch > m for m in config["milestones"])


def teacher_forward(teacher, images, config):
    """The frozen teacher's (logits, pooled features) under the run's autocast and memory format: eval mode, no
    graph. The online step and the teacher cache's fill both call this, so the two give the same numbers."""
    if config["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(torch.device(config["device"]).type, torch.bfloat16, enabled=config["bf16"]):
        return teacher(images, return_features=True)


def make_loss_fn(student, teacher, distill, config):
    """The per-batch objective: CE, plus the feature distance D and/or KD when a teacher is present.

    loss_fn(images, labels, teacher_features=None): the teacher runs on the batch unless its pooled features are
    given (read from the teacher cache); then only its classifier runs, on them. Returns (total, terms, correct) as
    device tensors: nothing here forces a CPU-GPU sync."""
    device_type = torch.device(config["device"]).type

    def loss_fn(images, labels, teacher_features=None):
        with torch.autocast(device_type, torch.bfloat16, enabled=config["bf16"]):
            logits, features = student(images, return_features=True)
            ce = F.cross_entropy(logits.float(), labels)
            feat = kd = torch.zeros((), device=images.device)
            if teacher is not None:
                if teacher_features is None:
                    teacher_logits, teacher_features = teacher_forward(teacher, images, config)
                else:  # the classifier on the cached features at this batch's size, exactly as the forward does
                    with torch.no_grad():
                        teacher_logits = teacher.head(teacher_features)
                if config["feat_weight"]:
                    feat = distill(features, teacher_features)  # float32 inside, whatever the autocast
                if config["kd_weight"]:
                    kd = losses.kd_loss(logits.float(), teacher_logits.float(), config["temperature"])
        total = config["ce_weight"] * ce + config["feat_weight"] * feat + config["kd_weight"] * kd
        terms = torch.stack([ce.detach(), feat.detach(), kd.detach(), total.detach()])
        return total, terms, (logits.argmax(1) == labels).sum()

    if not config["compile"]:
        return loss_fn
    # dynamic=False: every graph keeps static shapes; the last partial batch of an epoch compiles its own, once
    return torch.compile(loss_fn, dynamic=False, mode="reduce-overhead" if config["cuda_graphs"] else "default")


def make_optimizer(parameters, config):
    # fused: the whole update in one kernel; the same maths as the textbook loop, weight decay on every parameter
    fused = config["fused_sgd"]
    return torch.optim.SGD(parameters, lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"],
                           fused=fused, foreach=not fused)


@torch.no_grad()
def evaluate(model, loader, config):
    """Top-1 accuracy (%) without autocast, in eval mode (BatchNorm running statistics), one sync at the end.

    (Without autocast means float32 on the CPU; on CUDA, cuDNN runs float32 convolutions in TF32 by default.)"""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=config["device"])
    for images, labels in loader:
        if config["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        correct += (model(images).argmax(1) == labels).sum()
    model.train(was_training)
    return 100.0 * correct.item() / loader.num_samples


def train_step(loss_fn, optimizer, images, labels, config, teacher_features=None):
    """One SGD step; returns the loss terms and the correct count as device tensors (no host sync)."""
    if config["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    if config["cuda_graphs"]:
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the previous step's graph outputs are free
    total, terms, correct = loss_fn(images, labels, teacher_features)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return terms, correct


def train_one_epoch(loss_fn, optimizer, loader, config, estimate_epochs=0, then="", teacher_cache=None):
    """One pass over the training set; returns the mean loss terms (ce, feat, kd, total) and train accuracy (%).

    estimate_epochs > 0 on a CPU: after 10 steps, warn how long that many epochs take at this pace, and what
    follows them in the same job (`then`). teacher_cache: a TeacherCache, with a loader that names its views."""
    sums = torch.zeros(4, device=config["device"])  # summed over samples on the device: no sync per step
    correct = torch.zeros((), dtype=torch.long, device=config["device"])
    started = time.time()
    for step, (images, labels, *drawn) in enumerate(loader):
        teacher_features = teacher_cache.lookup(*drawn) if teacher_cache is not None else None
        terms, batch_correct = train_step(loss_fn, optimizer, images, labels, config, teacher_features)
        sums += terms * labels.shape[0]
        correct += batch_correct
        if config["device"] == "cpu" and estimate_epochs and step == 9:  # the CPU is synchronous: time is real
            minutes = (time.time() - started) / 10 * len(loader) * estimate_epochs / 60
            print(f"warning: at this CPU's pace the remaining {estimate_epochs} epochs need about "
                  + (f"{minutes / 60:.1f} h" if minutes > 90 else f"{minutes:.1f} min")
                  + (f", and {then} follows" if then else ""), flush=True)
    n = loader.num_samples
    *totals, total_correct = torch.cat([sums.double(), correct.double()[None]]).tolist()  # the epoch's one sync
    return [total / n for total in totals], 100.0 * total_correct / n


class TeacherCache:
    """The frozen teacher's pooled features for every training image under each of its 162 views, computed once.

    The teacher is in eval mode, so its output depends on the view alone: an image has 9 x 9 crop offsets x 2 flips,
    and 240 epochs at batch 64 (12 M teacher passes) can instead read rows image * 162 + view of a table filled by
    8.1 M passes in large batches. The same forward (teacher_forward) fills it, and each step runs the teacher's
    classifier on the rows it reads (logits are not stored: a matmul's last bits can depend on the batch size, and
    the features alone take 28% less memory for resnet32x4). So a run with the cache computes what a run without it
    does: bitwise on the CPU in float32 (test_train.py); on CUDA up to the kernels chosen per batch size."""

    def __init__(self, teacher, loader, config):
        n, started = loader.num_samples, time.time()
        self.features = None
        for view in range(data.NUM_VIEWS):  # all images under one view, in large batches
            offsets, flips = data.view_parameters(torch.tensor([view], device=config["device"]))
            for start in range(0, n, CACHE_BATCH):
                images = loader.images[start:start + CACHE_BATCH]
                views = data.crop_and_flip(images, offsets.expand(len(images), 2), flips.expand(len(images)))
                _, features = teacher_forward(teacher, loader.normalise(views), config)
                if self.features is None:  # in the dtype the online teacher gives (bf16 under autocast)
                    self.features = features.new_empty(n, data.NUM_VIEWS, features.shape[1])
                self.features[start:start + len(images), view] = features
        self.features = self.features.flatten(0, 1)
        if config["device"].startswith("cuda"):
            torch.cuda.synchronize()  # the kernels run asynchronously: wait, so the time below is the fill's
        self.fill_time_s = time.time() - started
        print(f"teacher cache filled: {n * data.NUM_VIEWS:,} views in {self.fill_time_s:.1f} s")

    def lookup(self, image_index, view):
        return self.features[image_index * data.NUM_VIEWS + view]

    @staticmethod
    def check_fits(teacher, num_images, config):
        """Refuse, before filling, a cache the device's free memory (on the CPU, the available RAM) cannot hold."""
        itemsize = 2 if config["bf16"] else 4
        needed = num_images * data.NUM_VIEWS * teacher.feature_dim * itemsize
        free = free_memory(config["device"])
        print(f"teacher cache: {num_images:,} images x {data.NUM_VIEWS} views x {teacher.feature_dim} features x "
              f"{itemsize} B = {needed / 2 ** 30:.2f} GiB on {config['device']}")
        if free is None:
            print("warning: this platform does not say how much memory is free: the cache's size is not checked")
        elif needed + CACHE_HEADROOM > free:
            sys.exit(f"error: the teacher cache needs {needed / 2 ** 30:.2f} GiB and {config['device']} has "
                     f"{free / 2 ** 30:.2f} GiB free, less the {CACHE_HEADROOM / 2 ** 30:.0f} GiB kept for "
                     f"training: run without --teacher-cache (the same training, with the teacher run each step)")


def free_memory(device):
    """Bytes free on a CUDA device, or available RAM for the CPU (Linux's MemAvailable, else free pages; None where
    the platform does not say)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # Windows has no sysconf, macOS not this name
            return None


def cudagraph_skips():
    """How many times inductor has fallen back from CUDA graphs in this process (it logs why only when asked)."""
    from torch._dynamo.utils import counters  # no public API counts these yet
    return counters["inductor"]["cudagraph_skips"]


def is_compile_error(error):
    """torch.compile's failures: dynamo's exceptions, and inductor's or Triton's (a C++ compiler missing or failing),
    which the lazily compiled backward pass can raise unwrapped."""
    return (isinstance(error, torch._dynamo.exc.TorchDynamoException)
            or type(error).__module__.startswith(("torch._inductor", "triton")))


def save_atomically(obj, path):
    """Write (torch.save, or as text a str) to a temporary file, then rename: a kill at any moment leaves the
    previous file intact."""
    tmp = Path(str(path) + ".tmp")
    try:
        tmp.write_text(obj) if isinstance(obj, str) else torch.save(obj, tmp)
    except BaseException:  # a full disk, a Ctrl-C: leave no half-written .tmp behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def sigint_deferred():
    """Ctrl-C inside the block takes effect at its end, so an epoch's log row and checkpoints are written together."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def claim_run_folder(out):
    """Hold an exclusive lock on out/.lock for the run's life: a second process on the same folder is refused.

    The operating system releases a flock when its process dies, however it dies, so a lock left by a killed run is
    free again; the file names the holder, for the message a refused run prints."""
    out.mkdir(parents=True, exist_ok=True)
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
        lock.truncate()
        lock.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)  # an empty lock file: the run ended cleanly
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_on_device(name, config):
    model = models.build_model(name).to(config["device"])
    return model.to(memory_format=torch.channels_last) if config["channels_last"] else model


def build_student(config, teacher=None):
    """The student, the feature-distillation module (srd only, else None) and one optimizer over both."""
    torch.manual_seed(config["seed"])  # the initialisation depends on the seed alone, not on the teacher's path
    student = build_on_device(config["student"], config)
    distill = None
    parameters = list(student.parameters())
    if config["method"] == "srd":
        distill = losses.FeatureDistillation(student.feature_dim, teacher.feature_dim, projector=config["projector"],
                                             hidden_dim=config["hidden_dim"], norm=config["norm"],
                                             distance=config["distance"], alpha=config["alpha"]).to(config["device"])
        parameters += list(distill.parameters())  # the projector is trained, with the same lr and weight decay
    return student, distill, make_optimizer(parameters, config)


def provide_teacher(config, datasets=None):
    """The frozen teacher: the file a resumed run recorded, else --teacher-ckpt, else the checkpoint an earlier run
    of this project left in runs/<teacher>, else one trained now. Records which file, by path and sha256, in config
    (hence config.json): a resumed run distils from exactly that teacher or refuses."""
    path = config["teacher_ckpt"]
    if config.get("teacher_sha256"):
        path = Path(config["teacher_file"])
        if not path.is_file() or data.digest_of(path, "sha256") != config["teacher_sha256"]:
            sys.exit(f"error: this run distils from the teacher in {path} (sha256 {config['teacher_sha256'][:16]}...), "
                     f"which is {'no longer that file' if path.is_file() else 'gone'}: resuming from another teacher "
                     f"would change the experiment. Put that file back, or start a new run")
    elif path is None:
        teacher_config = teacher_training_config(config)
        folder = default_run_folder(teacher_config)
        path = folder / "last.pt"
        if (folder / "summary.json").exists():
            trained = json.loads((folder / "summary.json").read_text())["last_epoch"]
            if trained < config["epochs"]:
                sys.exit(f"error: {folder} holds a teacher trained for {trained} epochs, fewer than this run's "
                         f"{config['epochs']}: pass --teacher-ckpt, or move that folder away to train a new one")
        else:
            unfinished = path.exists()
            if unfinished and (folder / "config.json").exists():  # finish it as it was started, to this job's length
                teacher_config = resumed_config(teacher_config, folder, given=set())
                teacher_config["epochs"] = max(teacher_config["epochs"], config["epochs"])
            print(f"the job, in two parts (no finished teacher {config['teacher']} was found; --teacher-ckpt uses a "
                  f"published one): 1. {'finish training' if unfinished else 'train'} {config['teacher']} alone, "
                  f"{teacher_config['epochs']} epochs, in {folder}; 2. distil {config['student']} from it for "
                  f"{config['epochs']} epochs")
            run(teacher_config, folder, resume=unfinished, datasets=datasets,
                then=f"the {config['epochs']}-epoch distillation of {config['student']}")
    teacher = build_on_device(config["teacher"], config)
    try:
        models.load_weights(teacher, path)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: teacher checkpoint {path}: {error}")
    print(f"teacher {config['teacher']} from {path}")
    config.update(teacher_file=str(Path(path).resolve()), teacher_sha256=data.digest_of(path, "sha256"))
    return teacher.eval().requires_grad_(False)


def describe(config, out):
    """The resolved configuration for the terminal: what differs from the defaults first (config.json has it all)."""
    argv = ["--student", config["student"], "--method", config["method"], "--device", config["device"]]
    defaults = resolve_config(parse_args(argv + (["--teacher", config["teacher"]] if config["teacher"] else [])))
    pairs = {"changed": [], "default": []}
    for key, value in config.items():
        if key not in ("student", "teacher", "method"):
            pairs["default" if defaults.get(key) == value else "changed"].append(f"{key}={value}")
    pair = f"{config['teacher']} -> {config['student']}" if config["teacher"] else config["student"]
    return "\n".join([f"run: {pair}, method {config['method']}, into {out}"] + [
        textwrap.fill(" ".join(items), 116, initial_indent=f"  {label}: ", subsequent_indent="    ")
        for label, items in (("not the defaults", pairs["changed"]), ("defaults", pairs["default"])) if items])


def check_run_folder(out, resume):
    """Refuse, before anything is loaded or written, a run that would overwrite results or could not save its own."""
    if resume and not (out / "last.pt").exists():
        sys.exit(f"error: --resume: no checkpoint {out / 'last.pt'}")
    if not resume and ((out / "last.pt").exists() or (out / "summary.json").exists()):
        sys.exit(f"error: run folder {out} holds results: pass --resume to continue it, or --out to start another")
    folder = out
    while not folder.exists():  # a new run folder: its nearest existing parent must take it
        folder = folder.parent
    try:
        tempfile.TemporaryFile(dir=folder).close()
        for name in ("config.json", "log.csv"):
            if (out / name).exists() and not os.access(out / name, os.W_OK):
                raise PermissionError(f"{out / name} is read-only")
    except OSError as error:
        sys.exit(f"error: cannot write in {folder} ({error}), so this run could not save its log and checkpoints; "
                 f"nothing was written. Make it writable, or choose another --out")


def what_is_intact(out):
    """For a failed resume's message: which of the run's files still hold its results."""
    try:
        best = models.read_checkpoint(out / "best.pt")
        notes = [f"best.pt (epoch {best['epoch']}, {best['accuracy']:.2f}% test) is intact and holds a full "
                 f"checkpoint: copy it over last.pt to resume from its epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        notes = ["best.pt is missing or unreadable too"]
    if (out / "log.csv").exists():
        notes.append(f"log.csv is intact ({len((out / 'log.csv').read_text().splitlines()) - 1} epochs)")
    return "; ".join(notes)


def read_run_checkpoint(out, config):
    """out/last.pt, checked to be a whole checkpoint of this run's student, or an error naming what is intact."""
    path = out / "last.pt"
    try:
        checkpoint = models.read_checkpoint(path)
        missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
        if missing:
            raise ValueError(f"{path} is not a checkpoint of a train.py run (it lacks {', '.join(missing)})")
        models.load_state(models.build_model(config["student"]), checkpoint["model"], path)
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot resume: {error}. Nothing was changed; {what_is_intact(out)}")
    return checkpoint


def run(config, out, resume=False, datasets=None, then=""):
    """Train (or resume) one run into the folder `out`; returns its summary dict.

    datasets: ((train images, labels), (test images, labels)) to use instead of config's (tests pass subsets).
    then: what follows this run in the same job, for the CPU duration warning."""
    out = Path(out)
    check_run_folder(out, resume)
    if resume:
        read_run_checkpoint(out, config)  # fail before the data and the teacher are loaded
    print(describe(config, out))
    if config["device"] == "cpu":
        print("warning: no CUDA device, training on the CPU: fine for tiny smoke runs, far too slow for the recipe")
    datasets = datasets or load_datasets(config)
    if len(datasets[0][1]) % config["batch_size"] == 1:
        sys.exit(f"error: {len(datasets[0][1])} training images in batches of {config['batch_size']} leave a last "
                 f"batch of one image, which BatchNorm cannot normalise: choose another --batch-size")
    teacher = provide_teacher(config, datasets) if config["teacher"] else None
    if config["teacher_cache"]:
        TeacherCache.check_fits(teacher, len(datasets[0][1]), config)
    with claim_run_folder(out):
        check_run_folder(out, resume)  # again: another process may have written here while this one loaded
        try:
            return fit(config, out, resume, teacher, datasets, then)
        except KeyboardInterrupt:
            print(interrupted(out, config, then), file=sys.stderr)
            raise SystemExit(130) from None  # 128 + SIGINT, as shells report it


def interrupted(out, config, then=""):
    try:
        epoch = models.read_checkpoint(out / "last.pt")["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"interrupted in the first epoch: no epoch completed, so {out} has nothing to resume; start again"
    job = f"; or run the command that started this job again: it resumes this run, then {then} follows" if then else ""
    return (f"interrupted: epoch {epoch} is the last complete one ({out / 'last.pt'}); continue with\n"
            f"  python train.py --student {config['student']} --out {shlex.quote(str(out))} --resume{job}")


def restore(checkpoint, student, distill, optimizer, train_loader):
    student.load_state_dict(checkpoint["model"])
    if distill is not None:
        distill.load_state_dict(checkpoint["projector"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    train_loader.load_state_dict(checkpoint["loader"])
    torch.set_rng_state(checkpoint["rng_cpu"])
    if "rng_cuda" in checkpoint:
        torch.cuda.set_rng_state(checkpoint["rng_cuda"])


def fit(config, out, resume, teacher, datasets, then=""):
    """The training loop of run(), in a run folder this process holds."""
    (train_images, train_labels), test_set = datasets
    student, distill, optimizer = build_student(config, teacher)
    cached = config["teacher_cache"]
    train_loader = data.Loader(train_images, train_labels, config["batch_size"], True, config["device"], config["seed"],
                               views=cached)
    test_loader = data.Loader(*test_set, 500, False, config["device"])

    start_epoch, best, wall_before, last = 1, {"accuracy": -1.0, "epoch": 0}, 0.0, None
    if resume:
        last = read_run_checkpoint(out, config)
        if last["epoch"] > config["epochs"]:
            sys.exit(f"error: {out} has completed {last['epoch']} epochs; --epochs {config['epochs']} would end it "
                     f"before them")
        try:
            restore(last, student, distill, optimizer, train_loader)
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            sys.exit(f"error: cannot resume: {out / 'last.pt'} does not fit this run's configuration "
                     f"({type(error).__name__}: {str(error)[:300]}). Nothing was changed; {what_is_intact(out)}")
        start_epoch, best, wall_before = last["epoch"] + 1, last["best"], last["wall_time_s"]
        rows = list(csv.DictReader(open(out / "log.csv")))  # drop rows logged after the checkpoint, if any
        write_log(out, [r for r in rows if int(r["epoch"]) < start_epoch], mode="w")
        print(f"resuming {out} at epoch {start_epoch}" if start_epoch <= config["epochs"] else
              f"{out} has completed its {config['epochs']} epochs: nothing to train (give --epochs to extend it)")
    else:
        write_log(out, [], mode="w")
    save_atomically(json.dumps(config, indent=2), out / "config.json")

    teacher_accuracy = None
    if teacher is not None:
        teacher_accuracy = evaluate(teacher, test_loader, config)
        print(f"teacher {config['teacher']} test accuracy {teacher_accuracy:.2f}")
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    teacher_cache = TeacherCache(teacher, train_loader, config) if cached else None
    torch.compiler.reset()  # drop what an earlier compile in this process (a teacher's run, say) holds
    loss_fn = make_loss_fn(student, teacher, distill, config)
    skips_before = cudagraph_skips()
    run_started = time.time()
    for epoch in range(start_epoch, config["epochs"] + 1):
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_started = time.time()
        estimate = config["epochs"] - epoch + 1 if epoch == start_epoch else 0  # warn once, after 10 steps
        try:
            mean_terms, train_accuracy = train_one_epoch(loss_fn, optimizer, train_loader, config, estimate, then,
                                                         teacher_cache)
        except Exception as error:
            if not (config["compile"] and is_compile_error(error)):
                raise
            first_lines = " | ".join(line.strip() for line in str(error).strip().splitlines()[:3] if line.strip())
            sys.exit(f"error: torch.compile failed on the training step ({type(error).__name__}: {first_lines[:500]}). "
                     f"Run the same command with --no-compile{' --resume' if start_epoch > 1 else ''}: the same "
                     f"training, uncompiled and slower. (It needs a working C++ compiler on the CPU, Triton on CUDA.)")
        if not all(map(math.isfinite, mean_terms)):
            kept = (f"{out / 'last.pt'} (epoch {epoch - 1}) is the last good checkpoint" if epoch > 1 else
                    "it was the first epoch, so no checkpoint was written")
            sys.exit(f"error: non-finite loss in epoch {epoch} (ce, feat, kd, total = {mean_terms}); {kept}")
        epoch_time = time.time() - epoch_started
        if config["cuda_graphs"] and epoch == start_epoch and cudagraph_skips() > skips_before:
            print("warning: torch declined to record CUDA graphs for part of the step, which runs as plain compiled "
                  "code; TORCH_LOGS=cudagraphs shows why", flush=True)
        test_accuracy = evaluate(student, test_loader, config)
        if test_accuracy > best["accuracy"]:
            best = {"accuracy": test_accuracy, "epoch": epoch}
        row = dict(zip(LOG_COLUMNS, [epoch, lr, *mean_terms, train_accuracy, test_accuracy, epoch_time,
                                     train_loader.num_samples / epoch_time]))
        last = {
            "model": student.state_dict(), "epoch": epoch, "accuracy": test_accuracy, "model_name": config["student"],
            "projector": distill.state_dict() if distill is not None else {}, "optimizer": optimizer.state_dict(),
            "loader": train_loader.state_dict(), "rng_cpu": torch.get_rng_state(), "best": best,
            "wall_time_s": wall_before + time.time() - run_started,
        }
        if config["device"].startswith("cuda"):
            last["rng_cuda"] = torch.cuda.get_rng_state()
        with sigint_deferred():  # the row, the checkpoints and the epoch's line: all of them or none
            write_log(out, [row])  # before last.pt: a kill in between leaves a row that resume drops, never a gap
            if best["epoch"] == epoch:
                save_atomically(last, out / "best.pt")
            save_atomically(last, out / "last.pt")
            print(f"epoch {epoch:3d}/{config['epochs']}  lr {lr:.4g}  loss {mean_terms[3]:.4f} (ce {mean_terms[0]:.4f} "
                  f"feat {mean_terms[1]:.4f} kd {mean_terms[2]:.4f})  train {train_accuracy:.2f}%  "
                  f"test {test_accuracy:.2f}%  {epoch_time:.1f}s  {row['images_per_s']:.0f} img/s", flush=True)

    summary = {"student": config["student"], "teacher": config["teacher"], "method": config["method"],
               "last_accuracy": last["accuracy"], "last_epoch": last["epoch"],
               "best_accuracy": best["accuracy"], "best_epoch": best["epoch"],
               "teacher_accuracy": teacher_accuracy, "wall_time_s": last["wall_time_s"]}
    save_atomically(json.dumps(summary, indent=2), out / "summary.json")
    print(f"done: {config['student']} test accuracy {summary['last_accuracy']:.2f}% at the last epoch "
          f"({summary['last_epoch']}), best {summary['best_accuracy']:.2f}% at epoch {summary['best_epoch']}; "
          f"results in {out}")
    return summary


def write_log(out, rows, mode="a"):
    """Append rows to log.csv; mode "w" rewrites it whole, through a temporary file and a rename."""
    path = out / "log.csv" if mode == "a" else out / "log.csv.tmp"
    try:
        with open(path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)
    except BaseException:
        if mode == "w":
            path.unlink(missing_ok=True)
        raise
    if mode == "w":
        os.replace(path, out / "log.csv")


def resumed_config(config, out, given):
    """The configuration recorded in out/config.json, with the flags in `given` (those on the command line) that
    may change (RESUME_MAY_CHANGE); any other given flag that differs from the record is refused by name."""
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot resume: {out / 'config.json'} is unreadable ({error}); nothing was changed")
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
    # keys newer than the run take today's values (an older config.json lacks them)
    config = {**config, **saved, **{key: config[key] for key in given & set(RESUME_MAY_CHANGE)}}
    if config["cuda_graphs"] and not config["compile"]:  # graphs replay the compiled step
        if "cuda_graphs" in given:
            sys.exit("error: --cuda-graphs needs --compile (it replays the compiled step)")
        config["cuda_graphs"] = False
    return config


def main(argv=None):
    args = parse_args(argv)
    config = resolve_config(args)
    out = Path(args.out) if args.out else default_run_folder(config)
    if args.resume and (out / "config.json").exists():
        config = resumed_config(config, out, args.given)
    if config["teacher_ckpt"]:  # fail fast, before any data is downloaded or a run folder is made
        try:
            models.load_weights(models.build_model(config["teacher"]), config["teacher_ckpt"])
        except (ValueError, FileNotFoundError) as error:
            sys.exit(f"error: teacher checkpoint {config['teacher_ckpt']}: {error}")
    try:
        return run(config, out, args.resume)
    except KeyboardInterrupt:  # before a run folder was claimed (a run's own interrupt exits inside run)
        print("interrupted before training began: nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
