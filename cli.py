"""The command line that train.py, bench.py and report.py share: a one-line error instead of argparse's usage block,
every default in --help, number types that refuse nan, inf and out-of-range values by name, and a run's records read
(recorded_config, as --resume trusts them), one message for each way they can be bad. No torch: report.py needs none."""
import argparse
import json
import math
import sys


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the description as written (its example commands), and each flag's default where it has one."""

    def _get_help_string(self, action):  # none where the help says it, or the default is derived ("None")
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": HelpWithDefaults, **kwargs})

    def error(self, message):  # one line, not the 15-line usage block that buries it
        self.exit(2, f"error: {message} ({self.prog} --help lists every flag)\n")


def number(kind=float, minimum=None, above=False, maximum=None, why=""):
    """argparse type: a finite int or float in [minimum (above: excluded), maximum]; nan and inf pass "> 0" checks."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = minimum is not None and (value <= minimum if above else value < minimum)
        if too_low or maximum is not None and value > maximum:
            bounds = [f"{'more than' if above else 'at least'} {minimum}" if minimum is not None else "",
                      f"at most {maximum}" if maximum is not None else ""]
            raise argparse.ArgumentTypeError(f"must be {' and '.join(filter(None, bounds))}{why}, got {text}")
        return value
    return parse


def flag(key):
    return "--" + key.replace("_", "-")


def given_flags(parser, argv, args):
    """The flags argv gives, for --resume's comparison (argparse fills in only what a namespace lacks)."""
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**{key: unset for key in vars(args)}))
    return {key for key, value in vars(given).items() if value is not unset}


def out_of_range(parser, record):
    """The first of record's values that its flag's type refuses ("lr 1e+300, out of --lr's range (...)"), or None."""
    for action in parser._actions:  # argparse has no public list of them
        values = record.get(action.dest)
        for value in (values if isinstance(values, list) else [values]) if action.type and values is not None else ():
            try:
                action.type(str(value))
            except argparse.ArgumentTypeError as error:
                return f"{action.dest} {value!r}, out of {action.option_strings[0]}'s range ({error})"


def read_json(path, required=()):
    """A JSON object from path, or ValueError saying why not (missing, unreadable, not an object, keys missing)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is {'missing' if not path.exists() else 'unreadable'} ({error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not a JSON object")
    missing = [key for key in required if key not in content]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return content


# ---- the recipe (CRD's, as the paper trains) and a run's record: train.py writes them; report.py, --resume read them -

RECIPE = {"feat_weight": 2.0, "temperature": 4.0, "projector": "mlp", "hidden_dim": 1024, "norm": "bn",
          "distance": "logsum", "alpha": 4.0, "batch_size": 64, "weight_decay": 5e-4}  # train.py's flag defaults
EPOCHS = 240
METHODS = ("srd", "kd", "none")  # the paper's loss, Hinton's KD, cross-entropy alone
SMALL_LR = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # models CRD trains with lr 0.01
# what a resumed run may change: its end (--epochs), where and how fast it runs (--device: checked apart)
RESUME_MAY_CHANGE = ("epochs", "data_dir", "no_download", "device", "compile", "channels_last", "fused_sgd",
                     "device_name", "capability")
# what a config.json older than each key means by its absence (precision, tf32: every run then was CPU float32)
LATER_KEYS = {"precision": "fp32", "tf32": False, "teacher_file": None, "teacher_sha256": None, "train_subset": None,
              "device_name": None, "capability": None, "data_md5": None}
REMOVED = ("cuda_graphs", "teacher_cache")  # opt-in flags of b3fc172, removed until a GPU measures a gain


def recipe(method, model, epochs=None):
    """RECIPE and the values that follow from the method, the model trained and the epochs (None: EPOCHS): the lr, the
    loss weights, and the lr milestones at 5/8, 6/8 and 7/8 of the epochs, rounded down; a run too short for three
    distinct ones decays once per distinct epoch (2 epochs: once, after the first), never twice at one epoch."""
    kd, epochs_run = method == "kd", epochs or EPOCHS
    return {**RECIPE, "epochs": EPOCHS, "milestones": sorted({max(1, epochs_run * k // 8) for k in (5, 6, 7)}),
            "lr": 0.01 if model in SMALL_LR else 0.05, "ce_weight": 0.1 if kd else 1.0, "kd_weight": 0.9 if kd else 0.0,
            "feat_weight": RECIPE["feat_weight"] if method == "srd" else 0.0}


def inert(config):
    """The names of the settings config records that change nothing in its run (train.make_loss_fn computes no feature
    term without srd or at feat_weight 0, no KD term without a teacher or at kd_weight 0): report.py ignores them."""
    srd, kd = config["method"] == "srd", config["method"] != "none" and config["kd_weight"] != 0
    feature = srd and config["feat_weight"] != 0
    effective = {"feat_weight": srd, "projector": feature, "norm": feature, "distance": feature, "temperature": kd,
                 "hidden_dim": feature and config["projector"] == "mlp", "kd_weight": config["method"] != "none",
                 "alpha": feature and config["distance"] in ("logsum", "pow")}  # corr's exponent is fixed at 4
    return {key for key, matters in effective.items() if not matters}


def recorded_config(out, checkpoint, required):
    """(the run's configuration, a note or ""): last.pt's record over config.json, else config.json with `required`."""
    record = (checkpoint or {}).get("config")
    record = record if isinstance(record, dict) else None
    try:
        saved, problem = read_json(out / "config.json", () if record else required), None
    except ValueError as error:
        saved, problem = None, str(error)
    for source in (record or {}, saved or {}):  # a removed flag left off (every run's default) is dropped
        if removed := [flag(key) for key in REMOVED if source.pop(key, False)]:
            sys.exit(f"error: cannot resume {out}: this train.py no longer has {', '.join(removed)}; resume it with "
                     f"the commit that ran it, b3fc172, or start a new run")
    if record is None:
        if problem:
            last = f"{out / 'last.pt'} (an older train.py's) records no configuration" if checkpoint else \
                f"there is no {out / 'last.pt'}: nothing to resume"
            sys.exit(f"error: cannot resume: {problem}, and {last}. Nothing was changed; restore config.json")
        return {**LATER_KEYS, **saved}, ""
    if problem:
        return record, f"note: {problem}: the configuration recorded in last.pt is used"
    differing = sorted(key for key in set(saved) | set(record) if key not in (*LATER_KEYS, *RESUME_MAY_CHANGE)
                       and saved.get(key) != record.get(key))
    return record, (f"note: {out / 'config.json'} differs from the configuration last.pt was trained with "
                    f"({', '.join(differing)}): last.pt's record is trusted and rewrites it" if differing else "")
