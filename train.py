"""Distil a CIFAR-100 teacher into a student with Miles & Mikolajczyk's projector loss, or with KD, or train alone.

    python train.py --teacher resnet32x4 --student resnet8x4      # the paper's method (SRD), 240 epochs
    python train.py --student resnet32x4                          # a model alone, on cross-entropy (a teacher)

A batch's path: data.Loader (augmented on the device) -> train_step -> make_loss_fn's loss (the student and the
frozen teacher of models.py, CE + 2.0 x losses.FeatureDistillation) -> backward -> SGD. The recipe is CRD's (Tian,
Krishnan & Isola, ICLR 2020), as in the paper. What a reader may skip: runs.py (the run folder), teachers.py (where
the teacher comes from) and devices.py (what each device gets)."""
import os
import signal
import sys

if __name__ == "__main__":  # a stop while torch loads (seconds): one line, no traceback; main() then takes over
    for _stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_stop, lambda signum, _: (print("stopped while starting: nothing was written", file=sys.stderr),
                                                 os._exit(128 + signum)))
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
import data
import devices
import losses
import models
import runs
import teachers

WARMUP_STEPS = 2  # per batch size: a compiled step compiles at its first call, cuDNN autotunes its kernels
NOT_RECORDED = ("resume", "out", "given", "device_lines", "from_record", "allow_slow")  # this command's, not the run's


# ---- the recipe and its flags ----------------------------------------------------------------------------------

def make_parser():
    positive, count = cli.number(minimum=0, above=True), cli.number(int, 1)
    p = cli.Parser(prog="python train.py", description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--student", choices=models.MODEL_NAMES, metavar="NAME", help="model to train (required, but "
                   "a resumed run's folder records it): " + ", ".join(models.MODEL_NAMES))
    p.add_argument("--teacher", choices=models.MODEL_NAMES, metavar="NAME", help="teacher to distil from (same names)")
    p.add_argument("--teacher-ckpt", help="teacher weights (this project's or the published ckpt_epoch_240.pth)")
    p.add_argument("--method", choices=cli.METHODS, help="srd: the paper's loss (default with a teacher); kd: Hinton "
                   "KD; none: cross-entropy alone (default without a teacher)")
    weight = cli.number(minimum=0, maximum=1000)  # beyond it, the loss's float32 overflows sooner or later
    p.add_argument("--feat-weight", type=weight, help="weight of the feature distance D (srd)")
    p.add_argument("--kd-weight", type=weight, help="weight of the KD term (default 0.9 for kd, 0 otherwise)")
    p.add_argument("--ce-weight", type=weight, help="weight of cross-entropy (default 0.1 for kd, 1 otherwise)")
    p.add_argument("--temperature", type=cli.number(minimum=0, above=True, maximum=100), help="KD temperature")
    p.add_argument("--projector", choices=losses.PROJECTORS, help="projector on the student feature")
    p.add_argument("--hidden-dim", type=cli.number(int, 1, maximum=2 ** 14), help="hidden width of the mlp projector")
    p.add_argument("--norm", choices=losses.NORMS, help="normalisation of both features")
    p.add_argument("--distance", choices=losses.DISTANCES, help="distance between them")
    p.add_argument("--alpha", type=positive, help="exponent of the logsum / pow distance")
    p.add_argument("--epochs", type=count, help="epochs (default 240; with --resume: where the run ends, its lr "
                   "schedule as recorded)")
    p.add_argument("--milestones", type=count, nargs="*", help="epochs after which lr drops x0.1 (default 5/8, 6/8 "
                   "and 7/8 of --epochs, rounded down: 150 180 210 for 240)")
    p.add_argument("--batch-size", type=cli.number(int, 2, why=" (BatchNorm needs batch statistics)"),
                   help="training batch size")
    p.add_argument("--lr", type=cli.number(minimum=0, above=True, maximum=10),
                   help=f"initial lr (default 0.05; 0.01 for {', '.join(cli.SMALL_LR)})")
    p.add_argument("--weight-decay", type=cli.number(minimum=0, maximum=1), help="SGD weight decay, on every parameter")
    p.add_argument("--seed", type=cli.number(int, 0, maximum=2 ** 63 - 1), default=0, help="seed of init, data order")
    data.add_flags(p, count)  # --dataset, --train-subset, --data-dir, --no-download
    runs.add_flags(p)  # --out, --resume
    p.set_defaults(**cli.RECIPE)  # the paper's recipe, one home shared with report.py; --help shows each
    devices.add_flags(p)  # --device, --precision, --allow-slow and the other speed switches
    return p


def parse_args(argv=None):
    argv, p = sys.argv[1:] if argv is None else list(argv), make_parser()
    args = p.parse_args(argv)
    if args.student is None:  # --resume FOLDER: parse again, the folder's record of what it trains first
        folder = args.resume if isinstance(args.resume, str) else args.out
        if not args.resume or folder is None:
            p.error("--student is required (to resume, --resume FOLDER or the job's own command with --resume)")
        args = parse_args(runs.recorded_identity(Path(folder)) + argv)
        args.from_record = True  # the run's flags are its record's: nothing to start a run with
        return args
    args.given = cli.given_flags(p, argv, args) - {"allow_slow"}  # for --resume's comparison with the record
    args.from_record = False
    args.method = args.method or ("srd" if args.teacher else "none")
    for wrong, message in (
            (args.teacher_ckpt and not args.teacher, "--teacher-ckpt needs --teacher NAME (the architecture to load)"),
            (args.teacher and args.method == "none", "--method none trains the student alone: drop --teacher"),
            (not args.teacher and args.method != "none", f"--method {args.method} needs --teacher"),
            ((args.train_subset or 100) % 100, f"--train-subset {args.train_subset}: not a multiple of 100 classes"),
            (args.milestones and args.milestones != sorted(set(args.milestones)), "--milestones must increase"),
            ((args.milestones or [0])[-1] > (args.epochs or cli.EPOCHS),
             f"--milestones {(args.milestones or [0])[-1]} is beyond --epochs {args.epochs or cli.EPOCHS}"),
            (isinstance(args.resume, str) and args.out and Path(args.out) != Path(args.resume),
             "--resume FOLDER and --out name two folders: give one")):
        if wrong:
            p.error(message)
    return args


def resolve_config(args):
    """Everything a run depends on, as config.json records it (the defaults: the paper's recipe, and devices.py's)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    devices.check(device)  # refused before anything is loaded; a CUDA device made the current one
    speed, args.device_lines = devices.choose(device, args)
    config = {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}
    recipe = cli.recipe(args.method, args.student, args.epochs)  # for the flags not given (None)
    config.update({key: value for key, value in recipe.items() if config[key] is None})
    config.update(feat_weight=args.feat_weight if args.method == "srd" else 0.0, device=device, **speed,
                  teacher_ckpt=str(Path(args.teacher_ckpt).resolve()) if args.teacher_ckpt else None)  # from anywhere
    if useless := sorted(cli.inert(config) & args.given):  # recorded, they would split one experiment's report rows
        sys.exit(f"error: {', '.join(map(cli.flag, useless))} would change nothing in this run (--method "
                 f"{config['method']}, --projector {config['projector']}, --distance {config['distance']}, --kd-weight "
                 f"{config['kd_weight']}): drop {'it' if len(useless) == 1 else 'them'}")
    if config["method"] == "srd" and config["projector"] == "none":  # refused now, not after a teacher part's training
        dims = {name: models.build_model(name).feature_dim for name in (config["student"], config["teacher"])}
        if len(set(dims.values())) > 1:
            sys.exit("error: --projector none compares the features as they are, but their widths differ ("
                     + ", ".join(f"{name} {dim}" for name, dim in dims.items()) + "): use --projector mlp or linear")
    return config


def lr_at(config, epoch):
    """Step schedule: x0.1 after each milestone (epochs count from 1: with 150, epoch 151 is the first at lr/10)."""
    return config["lr"] * 0.1 ** sum(epoch > m for m in config["milestones"])


def schedule(config):
    """The lr schedule in one line: "lr by epoch: 1-150 0.05, 151-180 0.005, 181-210 0.0005, 211-240 5e-05"."""
    ends = sorted({0, config["epochs"], *(m for m in config["milestones"] if m < config["epochs"])})
    return "lr by epoch: " + ", ".join(f"{first + 1}{f'-{last}' if last > first + 1 else ''} {lr_at(config, last):.4g}"
                                       for first, last in zip(ends, ends[1:]))


# ---- the networks: the frozen teacher, the student and its projector -------------------------------------------

def build_on_device(name, config):
    memory_format = torch.channels_last if config["channels_last"] else torch.preserve_format
    return models.build_model(name).to(config["device"], memory_format=memory_format)


def build_student(config, teacher=None):
    """The student, the feature-distillation module (srd only, else None) and one optimizer over both."""
    torch.manual_seed(config["seed"])  # the initialisation depends on the seed alone, not on the teacher's path
    student = build_on_device(config["student"], config)
    distill, parameters = None, list(student.parameters())
    if config["method"] == "srd":
        distill = losses.FeatureDistillation(student.feature_dim, teacher.feature_dim, projector=config["projector"],
                                             hidden_dim=config["hidden_dim"], norm=config["norm"],
                                             distance=config["distance"], alpha=config["alpha"]).to(config["device"])
        parameters += list(distill.parameters())  # the projector is trained, with the same lr and weight decay
    # fused: the whole update in one kernel; the same maths as the textbook loop, weight decay on every parameter
    optimizer = torch.optim.SGD(parameters, lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"],
                                fused=config["fused_sgd"], foreach=not config["fused_sgd"])
    # zero momentum buffers: with dampening 0 the textbook first step (buffer = gradient), and no garbage in fused SGD's
    # when fp16's loss scaler skips the first step (its kernel, which creates them uninitialised, then writes nothing)
    for parameter in parameters:
        optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    return student, distill, optimizer


# ---- the step --------------------------------------------------------------------------------------------------

def make_loss_fn(student, teacher, distill, config):
    """The per-batch objective: CE, plus the feature distance D and/or KD when a teacher is present. loss_fn(images,
    labels) returns (total, terms, correct) as device tensors: nothing here forces a CPU-GPU sync."""

    def loss_fn(images, labels):
        with devices.autocast(config):
            logits, features = student(images, return_features=True)
            ce = F.cross_entropy(logits.float(), labels)
            feat = kd = torch.zeros((), device=images.device)
            if teacher is not None:
                with torch.no_grad():  # the frozen teacher (eval mode): no graph
                    teacher_logits, teacher_features = teacher(images, return_features=True)
                if config["feat_weight"]:
                    feat = distill(features, teacher_features)  # float32 inside, whatever the autocast
                if config["kd_weight"]:
                    kd = losses.kd_loss(logits.float(), teacher_logits.float(), config["temperature"])
        total = config["ce_weight"] * ce + config["feat_weight"] * feat + config["kd_weight"] * kd
        terms = torch.stack([ce.detach(), feat.detach(), kd.detach(), total.detach()])
        return total, terms, (logits.argmax(1) == labels).sum()

    # dynamic=False: every graph keeps static shapes; the last partial batch of an epoch compiles its own, once
    return torch.compile(loss_fn, dynamic=False) if config["compile"] else loss_fn


def train_step(loss_fn, optimizer, scaler, images, labels):
    """One SGD step: the loss terms, the correct count and whether the loss scaler skipped the step, as device
    tensors (no host sync). Outside fp16 the scaler is disabled: backward and optimizer.step() as usual."""
    total, terms, correct = loss_fn(images, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()  # fp16: the loss scaled up, so that small gradients survive fp16's range
    scaler.step(optimizer)  # skipped where the scaled gradients overflowed to inf or NaN (a scale too large)
    if not scaler.is_enabled():
        return terms, correct, torch.zeros((), dtype=torch.long, device=images.device)
    scale = scaler._scale.clone()  # the scale tensor on the device: no public API reads it without a host sync
    scaler.update()  # halves the scale after a skipped step, doubles it after 2,000 steps without one
    return terms, correct, (scaler._scale < scale).long()


# ---- the epoch, and evaluation ---------------------------------------------------------------------------------

def train_one_epoch(loss_fn, optimizer, scaler, loader, config, warm=None):
    """One pass over the training set: the mean loss terms (ce, feat, kd, total), train accuracy (%), the number of
    steps the loss scaler skipped, and the warm-up (seconds, images): the first WARMUP_STEPS steps of each batch size
    in this process (the counts kept in `warm`) compile or autotune, so they are timed apart, between two syncs."""
    sums = torch.zeros(4, device=config["device"])  # summed over samples on the device: no sync per step
    counts = torch.zeros(2, dtype=torch.long, device=config["device"])  # correct samples, skipped steps
    warmup_s, warmup_images, warm = 0.0, 0, {} if warm is None else warm
    for images, labels in devices.shown(loader):
        cold = warm.get(len(labels), 0) < WARMUP_STEPS and (config["compile"] or config["device"] != "cpu")
        if cold:
            devices.synchronize(config["device"])
            started = time.time()
        terms, correct, skipped = train_step(loss_fn, optimizer, scaler, images, labels)
        sums += terms * labels.shape[0]
        counts += torch.stack([correct, skipped])
        if cold:
            devices.synchronize(config["device"])
            warmup_s, warmup_images = warmup_s + time.time() - started, warmup_images + len(labels)
            warm[len(labels)] = warm.get(len(labels), 0) + 1
    *totals, correct, skipped = torch.cat([sums.double(), counts.double()]).tolist()  # the epoch's one sync
    return ([total / loader.num_samples for total in totals], 100.0 * correct / loader.num_samples, int(skipped),
            (warmup_s, warmup_images))


@torch.no_grad()
def evaluate(model, loader, config):
    """Top-1 accuracy (%) in eval mode (BatchNorm's running statistics), without autocast, one sync at the end."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=config["device"])
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum()
    model.train(was_training)
    return 100.0 * correct.item() / loader.num_samples


# ---- the loop --------------------------------------------------------------------------------------------------

def run(config, out, resume=False, datasets=None):
    """Train (or resume) one run into the folder `out`; returns its summary dict. datasets: ((train images, labels),
    (test images, labels)) instead of config's (tests pass small ones)."""
    runs.check_folder(out := Path(out), resume, config)  # refuse before anything is loaded
    if resume:
        runs.read_checkpoint(out, config["student"])
    items = (f"{key}={value}".replace(" ", "\0") for key, value in config.items())  # wrapped between items only
    print(textwrap.fill(" ".join(items), 120, initial_indent=f"run in {out}: ", subsequent_indent="  ").replace(
        "\0", " "))  # all of it, as config.json
    print(schedule(config))
    try:
        datasets = datasets or data.load_datasets(config["dataset"], config["data_dir"], not config["no_download"],
                                                  config["train_subset"])
    except (OSError, data.DataError) as error:
        sys.exit(f"error: {error}")
    runs.check_data(config, out, datasets)  # their md5: recorded, or checked against the record on --resume
    if len(datasets[0][1]) % config["batch_size"] == 1:
        sys.exit(f"error: {len(datasets[0][1])} training images in batches of {config['batch_size']} leave a last "
                 f"batch of one image, which BatchNorm cannot normalise: choose another --batch-size")
    # teachers.py: a resumed run's, --teacher-ckpt, or this project's own, trained first by a call back into run()
    teacher = teachers.load(config, train=lambda *part: run(*part, datasets)) if config["teacher"] else None
    with runs.claimed(out, resume, config):  # the lock
        return fit(config, out, resume, teacher, datasets)


def fit(config, out, resume, teacher, datasets):
    """The training loop of run(), in a run folder this process holds."""
    devices.apply(config)  # cuDNN's autotuning, TF32 as recorded
    student, distill, optimizer = build_student(config, teacher)
    scaler = torch.amp.GradScaler(torch.device(config["device"]).type, enabled=config["precision"] == "fp16")
    train_loader = data.Loader(*datasets[0], config["batch_size"], True, config["device"], config["seed"],
                               channels_last=config["channels_last"])
    test_loader = data.Loader(*datasets[1], 500, False, config["device"], channels_last=config["channels_last"])
    start_epoch, best, wall_before, last = runs.start(out, config, resume, student, distill, optimizer,
                                                      train_loader, scaler)
    teacher_accuracy = evaluate(teacher, test_loader, config) if teacher is not None else None
    if teacher is not None:
        print(f"teacher {config['teacher']} test accuracy {teacher_accuracy:.2f}")
    torch.compiler.reset()  # drop what an earlier compile in this process (a teacher's run, say) holds
    loss_fn = make_loss_fn(student, teacher, distill, config)
    run_started, warm = time.time(), {}
    for epoch in range(start_epoch, config["epochs"] + 1):
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_started = time.time()
        with devices.compile_failures_explained(config, resumed=start_epoch > 1):
            mean_terms, train_accuracy, skipped, (warmup_s, warmup_images) = train_one_epoch(
                loss_fn, optimizer, scaler, train_loader, config, warm)
        epoch_time, steady_images = time.time() - epoch_started - warmup_s, train_loader.num_samples - warmup_images
        runs.check_finite(out, epoch, mean_terms, student, distill)  # the losses, and every weight and buffer
        test_accuracy = evaluate(student, test_loader, config)
        if test_accuracy > best["accuracy"]:
            best = {"accuracy": test_accuracy, "epoch": epoch}
        row = {"epoch": epoch, "lr": lr, **dict(zip(("loss_ce", "loss_feat", "loss_kd", "loss_total"), mean_terms)),
               "train_acc": train_accuracy, "test_acc": test_accuracy, "epoch_time_s": epoch_time, "warmup_s": warmup_s,
               "images_per_s": steady_images / epoch_time if steady_images else "", "skipped_steps": skipped,
               **(distill.spectrum() if distill is not None else {})}  # the projector's singular values
        last = runs.checkpoint(config, epoch, test_accuracy, best, wall_before + time.time() - run_started,
                               student, distill, optimizer, train_loader, scaler)
        with runs.stops_deferred():  # the row, the checkpoints and the epoch's line: all of them or none
            runs.save_epoch(out, row, last, is_best=best["epoch"] == epoch)
            print(runs.epoch_line(row, config["epochs"]), flush=True)
    return runs.finish(out, config, last, best, teacher_accuracy)


def step_seconds(config):
    """One training step's time here: the second of two, on random images (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        teacher = build_on_device(config["teacher"], config).eval() if config["teacher"] else None
        student, distill, optimizer = build_student(config, teacher)
        loss_fn, scaler = make_loss_fn(student, teacher, distill, config), torch.amp.GradScaler(enabled=False)
        images, labels = torch.randn(config["batch_size"], 3, 32, 32), torch.zeros(config["batch_size"]).long()
        for _ in range(2):
            started = time.time()
            train_step(loss_fn, optimizer, scaler, images, labels)
    return time.time() - started


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with runs.stops_explained(argv) as job:  # Ctrl-C or SIGTERM, anywhere: the truth read from the job's folders
        args = parse_args(argv)
        config = resolve_config(args)
        teacher_folder = teachers.own_folder(config, teachers.training_config(config))  # where the job trains it
        out, config, resume, done = runs.decide(job, args, config, teacher_folder, make_parser())
        if done:
            return done
        print("\n".join(args.device_lines))
        teachers.check_checkpoint(config)  # --teacher-ckpt: fail fast, before any data is downloaded or folder made
        if config["device"] == "cpu" and not resume:  # before any heavy work: how long, and what to run instead
            unfinished = teacher_folder and not runs.finished(teacher_folder)  # the job trains its teacher first
            teacher_part = teachers.training_config(config) if unfinished else None
            devices.advise_cpu(config, teacher_part, step_seconds, args.allow_slow)
        return run(config, out, resume)


if __name__ == "__main__":
    main()
