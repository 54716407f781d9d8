"""minimal.py computes what train.py computes: on the CPU in float32, from the same teacher file and seed, the same
student and projector weights (every parameter and BatchNorm buffer, bit for bit) and the same test accuracy."""
import pytest
import torch

import data
import minimal
import models
import train

EPOCHS = 3  # the recipe's milestones for 3 epochs are [1, 2]: the lr drops twice, so the schedule is compared too


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A freshly initialised resnet8 teacher in the published {"model": state_dict} layout, and small synthetic data
    (256 training images: 4 steps of 64 per epoch; 100 test images)."""
    folder = tmp_path_factory.mktemp("minimal")
    torch.manual_seed(123)  # not the runs' seed: the teacher's weights are not the student's initial ones
    torch.save({"model": models.build_model("resnet8").state_dict()}, folder / "teacher.pth")
    return folder, (data.fake_cifar100(256, seed=0), data.fake_cifar100(100, seed=1))


def run_train_py(setting, name, *flags):
    """train.py's srd run of resnet8 from the teacher file: (student state, projector state, last test accuracy)."""
    folder, datasets = setting
    argv = ["--teacher", "resnet8", "--teacher-ckpt", str(folder / "teacher.pth"), "--student", "resnet8",
            "--epochs", str(EPOCHS), "--device", "cpu", *flags]
    config = train.resolve_config(train.parse_args(argv))
    summary = train.run(config, folder / name, datasets=datasets)
    checkpoint = torch.load(folder / name / "last.pt", weights_only=True)
    return checkpoint["model"], checkpoint["projector"], summary["last_accuracy"]


def run_minimal_py(setting, seed=0):
    folder, datasets = setting
    teacher = models.build_model("resnet8")
    models.load_weights(teacher, folder / "teacher.pth")
    student, distill, accuracy = minimal.distil(teacher, "resnet8", datasets, EPOCHS, seed)
    return student.state_dict(), distill.state_dict(), accuracy


def differences(ours, theirs):
    """The names of the tensors that are not bitwise equal (or not in both)."""
    return sorted(set(ours) ^ set(theirs)) + [key for key in ours if key in theirs
                                              and not torch.equal(ours[key], theirs[key])]


@pytest.fixture(scope="module")
def both(setting):
    return run_train_py(setting, "train"), run_minimal_py(setting)


def test_minimal_computes_what_train_py_computes(both):
    (student, projector, accuracy), (minimal_student, minimal_projector, minimal_accuracy) = both
    assert not differences(minimal_student, student)
    assert not differences(minimal_projector, projector)
    assert len(projector) == 4 and len(student) > 50  # the mlp's two linear layers; every student tensor, buffers too
    assert minimal_accuracy == accuracy


@pytest.mark.parametrize("change", ["feat-weight 1.0", "milestones 2", "seed 1", "minimal seed 1"])
def test_the_comparison_sees_a_change(both, setting, change):
    """The equality above is not vacuous: the feature weight, the schedule or the seed changed in one of the two
    programs changes the student's weights and the projector's."""
    train_run, minimal_run = both
    if change.startswith("minimal"):
        minimal_run = run_minimal_py(setting, seed=1)
    else:
        flag, value = change.split()
        train_run = run_train_py(setting, change.replace(" ", "-"), f"--{flag}", value)
    assert differences(minimal_run[0], train_run[0]) and differences(minimal_run[1], train_run[1])
