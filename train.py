"""Distil a CIFAR-100 teacher into a student with Miles & Mikolajczyk's projector loss, or with KD, or train alone.

    python train.py --teacher resnet32x4 --student resnet8x4      # the paper's method (SRD), 240 epochs
    python train.py --student resnet32x4                          # a model alone, with cross-entropy (how teachers are made)

The recipe is CRD's (PAPER.md section 3). Each run writes config.json, log.csv, last.pt, best.pt and summary.json
into its own folder; --resume continues a run exactly where its last checkpoint left it.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, choices=models.MODEL_NAMES, metavar="NAME",
                   help="model to train: " + ", ".join(models.MODEL_NAMES))
    p.add_argument("--teacher", choices=models.MODEL_NAMES, metavar="NAME", help="teacher to distil from (same names)")
    p.add_argument("--teacher-ckpt", help="teacher weights (this project's or the published ckpt_epoch_240.pth)")
    p.add_argument("--method", choices=METHODS, help="srd: the paper's loss (default with a teacher); kd: Hinton KD; "
                   "none: cross-entropy alone (default without a teacher)")
    p.add_argument("--feat-weight", type=float, default=2.0, help="weight of the feature distance D (srd)")
    p.add_argument("--kd-weight", type=float, help="weight of the KD term (default 0.9 for kd, 0 otherwise)")
    p.add_argument("--ce-weight", type=float, help="weight of cross-entropy (default 0.1 for kd, 1 otherwise)")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    p.add_argument("--projector", choices=losses.PROJECTORS, default="mlp", help="projector on the student feature")
    p.add_argument("--hidden-dim", type=int, default=1024, help="hidden width of the mlp projector")
    p.add_argument("--norm", choices=losses.NORMS, default="bn", help="normalisation of both features")
    p.add_argument("--distance", choices=losses.DISTANCES, default="logsum", help="distance between them")
    p.add_argument("--alpha", type=float, default=4.0, help="exponent of the logsum / pow distance")
    p.add_argument("--epochs", type=int, help="epochs (default 240; with --resume: extend the run to this many)")
    p.add_argument("--milestones", type=int, nargs="*", default=[150, 180, 210], help="epochs where lr drops x0.1")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, help="initial lr (default 0.05, 0.01 for MobileNetV2/ShuffleV1/ShuffleV2)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay, on every parameter")
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
    for flag, what in (("bf16", "bf16 autocast of the networks (losses stay float32)"),
                       ("channels-last", "channels_last memory format"),
                       ("compile", "torch.compile of the training step"),
                       ("fused-sgd", "the SGD update in one fused kernel (else foreach)")):
        speed.add_argument("--" + flag, action=argparse.BooleanOptionalAction, help=what)
    speed.add_argument("--cuda-graphs", action="store_true", help="replay the compiled step as CUDA graphs "
                       "(torch.compile mode reduce-overhead); off by default: whether it pays off is unmeasured")
    args = p.parse_args(argv)

    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (BatchNorm needs batch statistics)")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.lr is not None and args.lr <= 0:
        p.error("--lr must be positive")
    if args.teacher_ckpt and not args.teacher:
        p.error("--teacher-ckpt needs --teacher NAME (the architecture to load it into)")
    args.method = args.method or ("srd" if args.teacher else "none")
    if args.teacher and args.method == "none":
        p.error("--method none trains the student alone: drop --teacher")
    if not args.teacher and args.method != "none":
        p.error(f"--method {args.method} needs --teacher")
    return args


def default_lr(student):
    return 0.01 if student in SMALL_LR_STUDENTS else 0.05


def resolve_config(args):
    """Everything a run depends on, as saved in config.json (the defaults are the paper's recipe)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    kd = args.method == "kd"
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "out")}
    config.update(
        epochs=args.epochs or 240,
        lr=args.lr or default_lr(args.student),
        ce_weight=args.ce_weight if args.ce_weight is not None else (0.1 if kd else 1.0),
        kd_weight=args.kd_weight if args.kd_weight is not None else (0.9 if kd else 0.0),
        feat_weight=args.feat_weight if args.method == "srd" else 0.0,
        device=device,
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
                lr=default_lr(config["teacher"]), ce_weight=1.0, kd_weight=0.0, feat_weight=0.0)


def default_run_folder(config):
    root = Path("runs") / ("" if config["dataset"] == "cifar100" else config["dataset"])
    if config["method"] == "none":
        return root / config["student"]
    return root / f"{config['teacher']}-{config['student']}-{config['method']}-seed{config['seed']}"


def load_datasets(config):
    if config["dataset"] in FAKE_SIZES:
        train_size, test_size = FAKE_SIZES[config["dataset"]]
        return data.fake_cifar100(train_size, seed=0), data.fake_cifar100(test_size, seed=1)
    download = not config["no_download"]
    try:
        return tuple(data.load_cifar100(config["data_dir"], train, download=download) for train in (True, False))
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")


def lr_at(config, epoch):
    """Step schedule: x0.1 at each milestone (epochs count from 1, so epoch 151 is the first at lr/10)."""
    return config["lr"] * 0.1 ** sum(epoch > m for m in config["milestones"])


def make_loss_fn(student, teacher, distill, config):
    """The per-batch objective: CE, plus the feature distance D and/or KD when a teacher is present.

    Returns (total, terms, correct) as device tensors: nothing here forces a CPU-GPU sync."""
    device_type = torch.device(config["device"]).type

    def loss_fn(images, labels):
        with torch.autocast(device_type, torch.bfloat16, enabled=config["bf16"]):
            logits, features = student(images, return_features=True)
            ce = F.cross_entropy(logits.float(), labels)
            feat = kd = torch.zeros((), device=images.device)
            if teacher is not None:
                with torch.no_grad():  # the teacher is frozen: eval mode, no graph
                    teacher_logits, teacher_features = teacher(images, return_features=True)
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


def train_step(loss_fn, optimizer, images, labels, config):
    """One SGD step; returns the loss terms and the correct count as device tensors (no host sync)."""
    if config["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    if config["cuda_graphs"]:
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the previous step's graph outputs are free
    total, terms, correct = loss_fn(images, labels)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return terms, correct


def train_one_epoch(loss_fn, optimizer, loader, config, estimate_epochs=0):
    """One pass over the training set; returns the mean loss terms (ce, feat, kd, total) and train accuracy (%)."""
    sums = torch.zeros(4, device=config["device"])  # summed over samples on the device: no sync per step
    correct = torch.zeros((), dtype=torch.long, device=config["device"])
    started = time.time()
    for step, (images, labels) in enumerate(loader):
        terms, batch_correct = train_step(loss_fn, optimizer, images, labels, config)
        sums += terms * labels.shape[0]
        correct += batch_correct
        if config["device"] == "cpu" and estimate_epochs and step == 9:  # the CPU is synchronous: time is real
            minutes = (time.time() - started) / 10 * len(loader) * estimate_epochs / 60
            print(f"warning: at this CPU's pace the remaining {estimate_epochs} epochs need about "
                  + (f"{minutes / 60:.1f} h" if minutes > 90 else f"{minutes:.1f} min"))
    n = loader.num_samples
    *totals, total_correct = torch.cat([sums.double(), correct.double()[None]]).tolist()  # the epoch's one sync
    return [total / n for total in totals], 100.0 * total_correct / n


def cudagraph_skips():
    """How many times inductor has fallen back from CUDA graphs in this process (it logs why only when asked)."""
    from torch._dynamo.utils import counters  # no public API counts these yet
    return counters["inductor"]["cudagraph_skips"]


def save_atomically(obj, path):
    """Write to a temporary file, then rename: a kill at any moment leaves the previous file intact."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    """--teacher-ckpt, else the checkpoint an earlier run of this project left in runs/<teacher>, else train one."""
    path = config["teacher_ckpt"]
    if path is None:
        teacher_config = teacher_training_config(config)
        folder = default_run_folder(teacher_config)
        path = folder / "last.pt"
        if (folder / "summary.json").exists():
            trained = json.loads((folder / "summary.json").read_text())["last_epoch"]
            if trained < config["epochs"]:
                sys.exit(f"error: {folder} holds a teacher trained for {trained} epochs, fewer than this run's "
                         f"{config['epochs']}: pass --teacher-ckpt, or move that folder away to train a new one")
        else:
            print(f"no checkpoint for teacher {config['teacher']}: training it first, into {folder} "
                  f"(pass --teacher-ckpt to use a published one)")
            run(teacher_config, folder, resume=path.exists(), datasets=datasets)
    teacher = build_on_device(config["teacher"], config)
    try:
        models.load_weights(teacher, path)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: teacher checkpoint {path}: {error}")
    print(f"teacher {config['teacher']} from {path}")
    return teacher.eval().requires_grad_(False)


def run(config, out, resume=False, datasets=None):
    """Train (or resume) one run into the folder `out`; returns its summary dict.

    datasets: ((train images, labels), (test images, labels)) to use instead of config's (tests pass subsets)."""
    out = Path(out)
    if resume and not (out / "last.pt").exists():
        sys.exit(f"error: --resume: no checkpoint {out / 'last.pt'}")
    if not resume and ((out / "last.pt").exists() or (out / "summary.json").exists()):
        sys.exit(f"error: run folder {out} holds results: pass --resume to continue it, or --out to start another")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    print("config:", json.dumps(config))
    if config["device"] == "cpu":
        print("warning: no CUDA device, training on the CPU: fine for tiny smoke runs, far too slow for the recipe")

    datasets = datasets or load_datasets(config)
    (train_images, train_labels), test_set = datasets
    if len(train_labels) % config["batch_size"] == 1:
        sys.exit(f"error: {len(train_labels)} training images in batches of {config['batch_size']} leave a last "
                 f"batch of one image, which BatchNorm cannot normalise: choose another --batch-size")
    teacher = provide_teacher(config, datasets) if config["teacher"] else None
    student, distill, optimizer = build_student(config, teacher)

    teacher_accuracy = None
    train_loader = data.Loader(train_images, train_labels, config["batch_size"], True, config["device"], config["seed"])
    test_loader = data.Loader(*test_set, 500, False, config["device"])
    if teacher is not None:
        teacher_accuracy = evaluate(teacher, test_loader, config)
        print(f"teacher {config['teacher']} test accuracy {teacher_accuracy:.2f}")

    start_epoch, best, wall_before = 1, {"accuracy": -1.0, "epoch": 0}, 0.0
    if resume:
        checkpoint = torch.load(out / "last.pt", map_location=config["device"], weights_only=True)
        student.load_state_dict(checkpoint["model"])
        if distill is not None:
            distill.load_state_dict(checkpoint["projector"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        train_loader.load_state_dict(checkpoint["loader"])
        torch.set_rng_state(checkpoint["rng_cpu"].cpu())
        if "rng_cuda" in checkpoint:
            torch.cuda.set_rng_state(checkpoint["rng_cuda"].cpu())  # map_location put it on the GPU; torch wants CPU
        start_epoch, best, wall_before = checkpoint["epoch"] + 1, checkpoint["best"], checkpoint["wall_time_s"]
        rows = list(csv.DictReader(open(out / "log.csv")))  # drop rows logged after the checkpoint, if any
        write_log(out, [r for r in rows if int(r["epoch"]) < start_epoch], mode="w")
        print(f"resuming {out} at epoch {start_epoch}")
    else:
        write_log(out, [], mode="w")

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
        mean_terms, train_accuracy = train_one_epoch(loss_fn, optimizer, train_loader, config, estimate)
        if not all(map(math.isfinite, mean_terms)):
            sys.exit(f"error: non-finite loss in epoch {epoch} (ce, feat, kd, total = {mean_terms}); "
                     f"the last good checkpoint is {out / 'last.pt'}")
        epoch_time = time.time() - epoch_started
        if config["cuda_graphs"] and epoch == start_epoch and cudagraph_skips() > skips_before:
            print("warning: torch declined to record CUDA graphs for part of the step, which runs as plain compiled "
                  "code; TORCH_LOGS=cudagraphs shows why", flush=True)
        test_accuracy = evaluate(student, test_loader, config)
        if test_accuracy > best["accuracy"]:
            best = {"accuracy": test_accuracy, "epoch": epoch}
        row = dict(zip(LOG_COLUMNS, [epoch, lr, *mean_terms, train_accuracy, test_accuracy, epoch_time,
                                     train_loader.num_samples / epoch_time]))
        print(f"epoch {epoch:3d}/{config['epochs']}  lr {lr:.4g}  loss {mean_terms[3]:.4f} (ce {mean_terms[0]:.4f} "
              f"feat {mean_terms[1]:.4f} kd {mean_terms[2]:.4f})  train {row['train_acc']:.2f}%  "
              f"test {test_accuracy:.2f}%  {epoch_time:.1f}s  {row['images_per_s']:.0f} img/s", flush=True)
        checkpoint = {
            "model": student.state_dict(), "epoch": epoch, "accuracy": test_accuracy, "model_name": config["student"],
            "projector": distill.state_dict() if distill is not None else {}, "optimizer": optimizer.state_dict(),
            "loader": train_loader.state_dict(), "rng_cpu": torch.get_rng_state(), "best": best,
            "wall_time_s": wall_before + time.time() - run_started,
        }
        if config["device"].startswith("cuda"):
            checkpoint["rng_cuda"] = torch.cuda.get_rng_state()
        write_log(out, [row])  # before last.pt: a kill in between leaves a row that resume drops, never a gap
        if best["epoch"] == epoch:
            save_atomically(checkpoint, out / "best.pt")
        save_atomically(checkpoint, out / "last.pt")

    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    summary = {"student": config["student"], "teacher": config["teacher"], "method": config["method"],
               "last_accuracy": last["accuracy"], "last_epoch": last["epoch"],
               "best_accuracy": best["accuracy"], "best_epoch": best["epoch"],
               "teacher_accuracy": teacher_accuracy, "wall_time_s": last["wall_time_s"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: {config['student']} test accuracy {summary['last_accuracy']:.2f}% at the last epoch "
          f"({summary['last_epoch']}), best {summary['best_accuracy']:.2f}% at epoch {summary['best_epoch']}; "
          f"results in {out}")
    return summary


def write_log(out, rows, mode="a"):
    """Append rows to log.csv; mode "w" rewrites it whole, through a temporary file and a rename."""
    path = out / "log.csv" if mode == "a" else out / "log.csv.tmp"
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)
    if mode == "w":
        os.replace(path, out / "log.csv")


def main(argv=None):
    args = parse_args(argv)
    config = resolve_config(args)
    out = Path(args.out) if args.out else default_run_folder(config)
    if args.resume and (out / "config.json").exists():
        # a resumed run keeps its recorded configuration (device included: random streams differ between
        # devices, so only the same one resumes exactly); --epochs alone may extend it
        saved = json.loads((out / "config.json").read_text())
        if args.device and args.device != saved["device"]:
            sys.exit(f"error: {out} ran on {saved['device']}; it can only resume there")
        if saved["device"].startswith("cuda") and not torch.cuda.is_available():
            sys.exit(f"error: {out} ran on {saved['device']}, and this machine has no CUDA device to resume it on")
        # (keys newer than the run take today's values: an older run's config.json lacks them)
        config = {**config, **saved, "epochs": args.epochs or saved["epochs"]}
    if config["teacher_ckpt"]:  # fail fast, before any data is downloaded or a run folder is made
        try:
            models.load_weights(models.build_model(config["teacher"]), config["teacher_ckpt"])
        except (ValueError, FileNotFoundError) as error:
            sys.exit(f"error: teacher checkpoint {config['teacher_ckpt']}: {error}")
    return run(config, out, args.resume)


if __name__ == "__main__":
    main()
