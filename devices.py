"""What each device gets: precision, compilation and the other speed switches, chosen from the hardware, and the
checks and messages around them. A reader of the training loop may skip this file.

    device (CUDA compute capability)            precision                   torch.compile   channels_last, fused SGD
    A100, H100, H200, RTX 30/40 (8.0 and up)    bf16 autocast               on              on
    V100 (7.0), T4 and RTX 20 (7.5)             fp16 autocast + GradScaler  on              on
    P100 (6.0) and older                        fp16 autocast + GradScaler  off             on
    CPU                                         fp32                        off             off

bf16 has tensor-core support from capability 8.0 on (below it torch.cuda.is_bf16_supported(including_emulation=False)
is False and bf16 is emulated, slowly); fp16 with dynamic loss scaling is the standard answer on 7.x, whose tensor
cores take fp16. torch.compile's Triton backend refuses GPUs below 7.0 (GPUTooOldForTriton), so those run eagerly.
channels_last and fused SGD stay on for every CUDA device: both are plain CUDA kernels with no capability floor, and
fused SGD applies the GradScaler's unscaling and skip inside its kernel. The losses are float32 in every case
(losses.py). A flag given on the command line always wins over these defaults.
"""
import argparse
import contextlib
import os
import sys

import torch

import data

PRECISIONS = ("bf16", "fp16", "fp32")
NATIVE_BF16, TRITON = (8, 0), (7, 0)  # the compute capabilities each needs
# what a CPU runs instead of the recipe: a short real-data experiment (the README's "No GPU?" line)
CPU_EXPERIMENT = "python train.py --teacher resnet20 --student resnet8 --train-subset 10000 --epochs 10"


def check(device):
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


def add_flags(parser):
    """--device and the speed switches, whose defaults choose() takes from the device."""
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present)")
    speed = parser.add_argument_group("speed (defaults chosen from the device: see devices.py)")
    speed.add_argument("--precision", choices=PRECISIONS, help="autocast of the networks (default bf16 on GPUs of "
                       "compute capability 8.0+, fp16 with loss scaling on older GPUs, fp32 on the CPU)")
    speed.add_argument("--bf16", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)  # before --precision
    for name, what in (("channels-last", "channels_last memory format (default on CUDA)"),
                       ("compile", "torch.compile of the step (default on CUDA of capability 7.0+)"),
                       ("fused-sgd", "the SGD update in one fused kernel, else foreach (default on CUDA)")):
        speed.add_argument("--" + name, action=argparse.BooleanOptionalAction, help=what)
    speed.add_argument("--cuda-graphs", action="store_true", help="replay the compiled step as CUDA graphs "
                       "(torch.compile mode reduce-overhead); off by default: whether it pays off is unmeasured")
    speed.add_argument("--teacher-cache", action="store_true", help="run the teacher once on all 162 views of every "
                       "training image, then look its outputs up (exact); off by default: its gain is unmeasured")


def choose(device, args):
    """The speed switches of a run on `device` (the table above), each overridden by its flag where one was given;
    returns them with the device's name and capability, and the lines saying what was chosen and why."""
    asked, lines = {key: getattr(args, key) for key in ("precision", "compile", "channels_last", "fused_sgd")}, []
    if args.bf16 is not None:  # the switch --precision replaced, kept working for a while
        alias, old = ("bf16", "--bf16") if args.bf16 else ("fp32", "--no-bf16")
        if asked["precision"] not in (None, alias):
            sys.exit(f"error: --precision {asked['precision']} contradicts {old}: give --precision alone")
        asked["precision"] = alias
        lines.append(f"warning: {old} is deprecated: it means --precision {alias} (use that)")
    if not device.startswith("cuda"):
        name, capability = "cpu", None
        default = {"precision": "fp32", "compile": False, "channels_last": False, "fused_sgd": False}
    else:
        name, capability = torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))
        default = {"precision": "bf16" if capability >= NATIVE_BF16 else "fp16", "compile": capability >= TRITON,
                   "channels_last": True, "fused_sgd": True}
    chosen = {key: default[key] if asked.get(key) is None else asked[key] for key in default}
    if args.cuda_graphs and not (capability and chosen["compile"]):
        sys.exit("error: --cuda-graphs needs a CUDA device and --compile (it replays the compiled step)")
    chosen.update(device_name=name, capability=None if capability is None else "%d.%d" % capability)
    why_precision = why_compile = ""
    if capability and asked.get("precision") is None:
        why_precision = ", bf16 is native here" if chosen["precision"] == "bf16" else ", bf16 is not native here"
    if capability and not chosen["compile"] and asked.get("compile") is None:
        why_compile = " (torch.compile's Triton backend needs compute capability 7.0; --compile forces it)"
    lines.insert(0, line(chosen, why_precision, why_compile))
    where = line(chosen).split(": ")[1]
    if capability and chosen["precision"] == "bf16" and capability < NATIVE_BF16:
        lines.append(f"warning: --precision bf16 on {where}, which has no native bf16: torch emulates it, slowly; "
                     f"--precision fp16 (the default here) runs on its tensor cores")
    if not capability and chosen["precision"] == "fp16":
        lines.append("warning: --precision fp16 on the CPU: torch emulates fp16 there, slower than fp32; it is for "
                     "testing the fp16 path (the CPU's default is --precision fp32)")
    return chosen, lines


def line(config, why_precision="", why_compile=""):
    """What a run's device gets, in one line: "device: Tesla T4 (compute capability 7.5): fp16 autocast ..."."""
    where = config["device_name"] + (f" (compute capability {config['capability']})" if config["capability"] else "")
    precision = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling", "fp32": "fp32"}[config["precision"]]
    return f"device: {where}: {precision}{why_precision}; {'compiled' if config['compile'] else 'eager'}{why_compile}"


def autocast(config):
    """The autocast of the run's networks: bf16 or fp16 per --precision, none for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["precision"])
    return torch.autocast(torch.device(config["device"]).type, dtype or torch.float32, enabled=dtype is not None)


def free_memory(device):
    """Bytes free on a CUDA device, or available RAM for the CPU (Linux's MemAvailable, else free pages; None where
    the platform does not say)."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # Windows has no sysconf, macOS not this name
            return None


def duration(seconds):
    """A duration as a person reads it: minutes below 2 h, hours up to 48 h, then days."""
    hours = seconds / 3600
    return f"{seconds / 60:.0f} min" if hours < 2 else f"{hours:.1f} h" if hours <= 48 else f"{hours / 24:.1f} days"


def advise_cpu(config, teacher_config, step_seconds):
    """On the CPU, before any heavy work: how long the job takes here, and what to run instead when that is long.
    teacher_config: the recipe of a teacher the job trains first, or None; step_seconds(config) times one step.
    Tiny jobs (under 100,000 images in all: smoke runs, tests) are not timed."""
    images = data.train_size(config["dataset"], config["train_subset"])
    parts = [(teacher_config, f"the teacher {config['teacher']}")] if teacher_config else []
    parts.append((config, f"{config['student']} {'alone' if config['method'] == 'none' else config['method']}"))
    if len(parts) * config["epochs"] * images < 100_000:
        return
    steps = config["epochs"] * -(-images // config["batch_size"])
    seconds = [step_seconds(part) * steps for part, _ in parts]
    plan = ", then ".join(f"{what} ({duration(s)})" for (_, what), s in zip(parts, seconds))
    long = sum(seconds) > 6 * 3600
    print(f"{'warning' if long else 'note'}: no CUDA device: on this CPU the job needs about {duration(sum(seconds))}"
          f" ({plan}, {config['epochs']} epochs{' each' if len(parts) > 1 else ''}, at the pace of a few steps timed "
          f"here)" + (f". A CPU suits a short real-data experiment instead (the README's 'No GPU?'): {CPU_EXPERIMENT}"
                      if long else ""), flush=True)


def cudagraph_skips():
    """How many times inductor has fallen back from CUDA graphs in this process (it logs why only when asked)."""
    from torch._dynamo.utils import counters  # no public API counts these yet
    return counters["inductor"]["cudagraph_skips"]


def warn_if_graphs_skipped(skips_before):
    """With --cuda-graphs: torch falls back to plain compiled code silently unless asked; say so once."""
    if cudagraph_skips() > skips_before:
        print("warning: torch declined to record CUDA graphs for part of the step, which runs as plain compiled "
              "code; TORCH_LOGS=cudagraphs shows why", flush=True)


def is_compile_error(error):
    """torch.compile's failures: dynamo's exceptions, and inductor's or Triton's (a C++ compiler missing or failing,
    a GPU too old for Triton), which the lazily compiled backward pass can raise unwrapped."""
    return (isinstance(error, torch._dynamo.exc.TorchDynamoException)
            or type(error).__module__.startswith(("torch._inductor", "triton")))


@contextlib.contextmanager
def compile_failures_explained(config, resumed):
    """A torch.compile failure inside the block exits with its first lines and --no-compile as the way out (no
    silent fallback: the user decides)."""
    try:
        yield
    except Exception as error:
        if not (config["compile"] and is_compile_error(error)):
            raise
        first_lines = " | ".join(line.strip() for line in str(error).strip().splitlines()[:3] if line.strip())
        sys.exit(f"error: torch.compile failed on the training step ({type(error).__name__}: {first_lines[:500]}). "
                 f"Run the same command with --no-compile{' --resume' if resumed else ''}: the same training, "
                 f"uncompiled and slower. (It needs a working C++ compiler on the CPU, Triton on CUDA.)")
