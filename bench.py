"""Time distillation training steps: the field's reference-style pipeline against this project's train.py step.

    python bench.py --teacher resnet32x4 --student resnet8x4            # on a GPU: the speed table of the README
    python bench.py --teacher resnet8 --student resnet8 --steps 3 --num-images 256 --workers 0   # CPU smoke run

reference: PIL transforms in DataLoader workers, fp32, eager, a `.item()` per step (RepDistiller-style meters).
project: train.train_step on data.Loader, train.py's defaults for the device. Each runs train.make_loss_fn's
objective on synthetic images, its warm-up timed apart."""
import itertools
import os
import time
import traceback

import torch
from PIL import Image

import cli
import data
import train

PIPELINE_FLAGS = {"reference": ["--precision", "fp32", "--no-channels-last", "--no-compile", "--no-fused-sgd"],
                  "project": []}
# (on CUDA, on the CPU): CUDA's would take hours on a CPU; 2,000 images hold (3 + 20) x 64 in one DataLoader epoch
SIZED = {"steps": (200, 20), "warmup": (30, 3), "num_images": (50_000, 2000)}


class PILImages(list):
    """A Dataset as the reference codebases have it: (HWC uint8 array, label) pairs, each through PIL transforms."""

    def __init__(self, images, labels):
        from torchvision import transforms as T
        super().__init__(zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist()))
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(data.CIFAR100_MEAN, data.CIFAR100_STD)])

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return self.transform(Image.fromarray(image)), label


def time_pipeline(args, method, pipeline, images, labels):
    """(seconds per timed step, seconds of the warm-up steps)."""
    argv = ["--student", args.student, "--method", method, "--device", args.device, "--batch-size",
            str(args.batch_size), *PIPELINE_FLAGS[pipeline], *(["--teacher", args.teacher] if method != "none" else [])]
    config = train.resolve_config(train.parse_args(argv))
    torch.compiler.reset()  # a fresh compile cache each time: the step's code object allows only 8 entries
    teacher = train.build_on_device(args.teacher, config).eval().requires_grad_(False) if method != "none" else None
    student, distill, optimizer = train.build_student(config, teacher)
    loss_fn = train.make_loss_fn(student, teacher, distill, config)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=config["precision"] == "fp16")
    reference = pipeline == "reference"
    if reference:
        loader = torch.utils.data.DataLoader(PILImages(images, labels), args.batch_size, shuffle=True,
                                             num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                                             persistent_workers=args.workers > 0)
    else:  # as train.fit builds it
        loader = data.Loader(images, labels, config["batch_size"], True, config["device"], config["seed"],
                             channels_last=config["channels_last"])
    batches, seconds = itertools.chain.from_iterable(itertools.repeat(loader)), []
    for count in (args.warmup, args.steps):
        started = time.perf_counter()
        for _ in range(count):
            x, y = next(batches)
            terms, correct, _ = train.train_step(loss_fn, optimizer, scaler, x.to(args.device), y.to(args.device))
            if reference:
                terms[3].item(), correct.item()  # the reference loops' meters: a host sync every step
        train.devices.synchronize(args.device)
        seconds.append(time.perf_counter() - started)
    return seconds[1] / args.steps, seconds[0]


def parse_args(argv=None):
    p = cli.Parser(prog="python bench.py", description=__doc__)
    for flag, default, what in (("--teacher", "resnet32x4", "teacher (random weights: timing only)"),
                                ("--student", "resnet8x4", "student: " + ", ".join(train.models.MODEL_NAMES))):
        p.add_argument(flag, default=default, choices=train.models.MODEL_NAMES, metavar="NAME", help=what)
    p.add_argument("--methods", nargs="+", choices=cli.METHODS, default=list(cli.METHODS), help="objectives")
    p.add_argument("--pipelines", nargs="+", choices=PIPELINE_FLAGS, default=list(PIPELINE_FLAGS), help="to time")
    for flag, kind, what in (("--steps", cli.number(int, 1, maximum=100_000), "timed steps per measurement"),
                             ("--warmup", cli.number(int, 0, maximum=10_000), "untimed steps first"),
                             ("--num-images", cli.number(int, 2, maximum=100_000), "synthetic training images")):
        on_cuda, on_cpu = SIZED[flag[2:].replace("-", "_")]
        p.add_argument(flag, type=kind, help=f"{what} (default {on_cuda:,} on CUDA, {on_cpu:,} on the CPU)")
    p.add_argument("--batch-size", type=cli.number(int, 2, maximum=4096), default=64, help="batch size")
    p.add_argument("--workers", type=cli.number(int, 0, maximum=32, why=" (each is a process)"),
                   default=min(8, os.cpu_count() or 1), help="reference DataLoader workers (RepDistiller's 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    vars(args).update({name: sizes[not on_cuda] for name, sizes in SIZED.items() if vars(args)[name] is None})
    if args.num_images % args.batch_size == 1:
        p.error("--num-images leaves a last batch of one image, which BatchNorm cannot normalise")
    # reference first: its DataLoader forks workers before any compiler has started threads in this process
    args.pipelines = sorted(args.pipelines, key=list(PIPELINE_FLAGS).index)
    return args


def main(argv=None):
    args = parse_args(argv)
    train.devices.check(args.device)  # a device this machine lacks: refused in one paragraph, as train.py does
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"{args.teacher} -> {args.student}, batch {args.batch_size}, {args.num_images:,} images, {args.workers} "
          f"workers (reference), {args.warmup} warm-up + {args.steps} timed steps, {device}, torch {torch.__version__}"
          f"\nmethod pipeline     ms/step  images/s warm-up s", flush=True)
    torch.backends.cudnn.benchmark = True  # every pipeline, as RepDistiller and train.py set it
    images, labels = data.fake_cifar100(args.num_images)
    results, failed = {}, []
    for pipeline, method in itertools.product(args.pipelines, args.methods):
        try:
            step_s, warmup_s = time_pipeline(args, method, pipeline, images, labels)
        except Exception:  # one broken variant must not cost the other measurements
            traceback.print_exc()
            print(f"{method:6s} {pipeline:9s} FAILED (traceback on stderr)", flush=True)
            failed.append((method, pipeline))
            continue
        results[method, pipeline] = row = {"step_ms": 1e3 * step_s, "images_per_s": args.batch_size / step_s,
                                           "warmup_s": warmup_s}
        print(f"{method:6s} {pipeline:9s}" + "".join(f"{value:10.2f}" for value in row.values()), flush=True)
    return results, failed


if __name__ == "__main__":
    raise SystemExit(1 if main()[1] else 0)
