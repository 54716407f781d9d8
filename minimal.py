"""The paper's method in one loop: distil a frozen CIFAR-100 teacher into a student with CE + 2.0 x D (SRD).

    python minimal.py --teacher resnet32x4 --teacher-ckpt ckpt_epoch_240.pth --student resnet8x4

D = log sum_{b,j} |r_bj|^4 with r = BN(P(z_s)) - BN(z_t): the student's pooled features z_s through a projector P
trained with it, against the frozen teacher's z_t (losses.FeatureDistillation). train.py adds what a reader may skip
(mixed precision, compilation, checkpoints, resume) and, on the CPU in float32, computes the same weights bit for bit.
"""
import torch
import torch.nn.functional as F

import cli
import data
import losses
import models


@torch.no_grad()
def evaluate(model, loader):
    model.eval()  # BatchNorm normalises with its running statistics, not the test batch's
    correct = sum((model(images).argmax(1) == labels).sum() for images, labels in loader)
    return 100.0 * correct.item() / loader.num_samples  # top-1 accuracy (%)


def distil(teacher, student_name, datasets, epochs, seed=0, device="cpu"):
    """Train student_name from teacher; returns the student, the FeatureDistillation (its projector) and top-1 (%)."""
    teacher.to(device).eval().requires_grad_(False)  # frozen: BatchNorm's running statistics, no gradients
    recipe = cli.recipe("srd", student_name, epochs)  # CRD's: lr 0.05, batch 64, x0.1 at 5/8, 6/8, 7/8 of the epochs
    train_loader = data.Loader(*datasets[0], recipe["batch_size"], True, device, seed)  # crops and flips, on device
    test_loader = data.Loader(*datasets[1], 500, False, device)
    print(f"teacher test top-1 {evaluate(teacher, test_loader):.2f}%")
    torch.manual_seed(seed)  # the student's and the projector's initialisation
    student = models.build_model(student_name).to(device)
    # the paper's D: an mlp projector of width 1024, BatchNorm on both sides, log sum |r|^alpha with alpha 4
    choices = {key: recipe[key] for key in ("projector", "hidden_dim", "norm", "distance", "alpha")}
    distill = losses.FeatureDistillation(student.feature_dim, teacher.feature_dim, **choices).to(device)
    parameters = [*student.parameters(), *distill.parameters()]  # the projector learns too, or D cannot fall
    optimizer = torch.optim.SGD(parameters, lr=recipe["lr"], momentum=0.9, weight_decay=recipe["weight_decay"])
    for epoch in range(1, epochs + 1):
        lr = recipe["lr"] * 0.1 ** sum(epoch > milestone for milestone in recipe["milestones"])
        optimizer.param_groups[0]["lr"] = lr  # one group: the student and the projector alike
        student.train()  # BatchNorm on batch statistics again (evaluate left it in eval mode)
        sums = torch.zeros(2, device=device)  # summed on the device: one CPU-GPU sync per epoch, not one per step
        for images, labels in train_loader:
            _, teacher_features = teacher(images, return_features=True)  # frozen: autograd records nothing here
            logits, features = student(images, return_features=True)
            ce, feat = F.cross_entropy(logits, labels), distill(features, teacher_features)
            loss = ce + recipe["feat_weight"] * feat
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([ce, feat]).detach() * len(labels)
        ce, feat = (sums / train_loader.num_samples).tolist()
        accuracy = evaluate(student, test_loader)
        print(f"epoch {epoch}/{epochs}  lr {lr:.4g}  ce {ce:.4f}  D {feat:.4f}  test top-1 {accuracy:.2f}%", flush=True)
    return student, distill, accuracy


def main(argv=None):
    p = cli.Parser(prog="python minimal.py", description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--teacher", default="resnet32x4", choices=models.MODEL_NAMES, metavar="NAME", help="teacher model")
    p.add_argument("--teacher-ckpt", required=True, help="its weights (the published ckpt_epoch_240.pth, or a last.pt)")
    p.add_argument("--student", default="resnet8x4", choices=models.MODEL_NAMES, metavar="NAME",
                   help="the model to train: " + ", ".join(models.MODEL_NAMES))
    p.add_argument("--epochs", type=cli.number(int, 1), default=cli.EPOCHS, help="epochs of training")
    p.add_argument("--seed", type=cli.number(int, 0), default=0, help="seed of the initialisation and the data order")
    data.add_flags(p, cli.number(int, 100))  # --dataset, --train-subset, --data-dir, --no-download
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # no autocast: float32 (cuDNN convolves in TF32 on Ampere+)
    try:
        teacher = models.build_model(args.teacher)
        models.load_weights(teacher, args.teacher_ckpt)
        datasets = data.load_datasets(args.dataset, args.data_dir, not args.no_download, args.train_subset)
    except (OSError, ValueError) as error:  # a missing or foreign checkpoint, no CIFAR-100: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    distil(teacher, args.student, datasets, args.epochs, args.seed, device)


if __name__ == "__main__":
    main()
