"""Train the bundled zoo models on the full Fashion-MNIST training set.

Run from the repo root, e.g.::

    python tools/train_zoo.py --model resnet --epochs 8
    python tools/train_zoo.py --write-subset

Writes fxq/zoo/weights/{name}_fmnist.pt and a provenance .json beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

# Must precede the torch import. On a shared 2-core box OpenMP's default
# spin-waiting made a contended epoch 3-4x slower than passive waiting did.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # lets the script run without installing fxq
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fxq import data, zoo  # noqa: E402

# Per-model defaults, chosen to fit ~12 minutes on 2 CPU cores (the ViT: ~30). Transformers train
# poorly with SGD, so the ViT gets AdamW with the usual decoupled weight decay.
DEFAULTS = {
    "resnet": {"epochs": 8, "lr": 0.1, "optimizer": "sgd"},
    "mobilenetv2": {"epochs": 6, "lr": 0.1, "optimizer": "sgd"},
    "vit": {"epochs": 12, "lr": 2e-3, "optimizer": "adamw"},
}
WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}
PAD = 2


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2px-padded crop and horizontal flip, batched so it costs ~nothing."""
    n, _, h, w = x.shape
    background = (0.0 - data.MEAN) / data.STD  # a zero pixel after normalisation
    padded = F.pad(x, (PAD, PAD, PAD, PAD), value=background)
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [n,h,1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [n,1,w]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        xb = x[i : i + bs].contiguous(memory_format=torch.channels_last)
        correct += (model(xb).argmax(1) == y[i : i + bs]).sum().item()
    return 100.0 * correct / len(x)


def _optimizer(kind: str, model: torch.nn.Module, lr: float) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and its description for the provenance record."""
    wd = WEIGHT_DECAY[kind]
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd), f"AdamW(weight_decay={wd}) + OneCycleLR"
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    return opt, f"SGD(momentum=0.9, nesterov, weight_decay={wd}) + OneCycleLR"


def train(name: str, epochs: int, seed: int, batch_size: int, lr: float, optimizer: str = "sgd") -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = data.load_fashion_mnist("train")
    x_test, y_test = data.load_fashion_mnist("test")

    # channels_last roughly halves CPU training time for these small convs.
    model = zoo.TRAINABLE[name]().to(memory_format=torch.channels_last)
    opt, opt_text = _optimizer(optimizer, model, lr)
    steps = len(x_train) // batch_size  # drop the ragged last batch: BN dislikes tiny ones
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.25
    )

    train_seconds = 0.0
    loadavg = []  # train_seconds is only comparable between equally loaded runs
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps), desc=f"{name} {epoch + 1}/{epochs}", mininterval=2.0)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            xb = augment(x_train[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
        train_seconds += time.perf_counter() - t0
        loadavg.append(round(os.getloadavg()[0], 2))
        acc = evaluate(model, x_test, y_test)
        tqdm.write(f"{name} epoch {epoch + 1}: test acc {acc:.2f}% ({train_seconds:.0f}s train)")
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{name}: loss diverged at epoch {epoch + 1}")

    model = model.to(memory_format=torch.contiguous_format).eval()
    acc = evaluate(model, x_test, y_test)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    zoo.WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(state, zoo.weights_path(name))
    record = {
        "model": name,
        "dataset": "fashion-mnist (dataset-fashion-mnist, full 60k train / 10k test)",
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": opt_text,
        "augmentation": f"random crop (pad {PAD}) + horizontal flip",
        "fp32_test_accuracy": round(acc, 2),
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "loadavg_1min_per_epoch": loadavg,
        "torch_version": torch.__version__,
        "date": dt.date.today().isoformat(),
        "command": shlex.join(["python", "tools/train_zoo.py", *sys.argv[1:]]),
    }
    with open(zoo.provenance_path(name), "w") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=[*zoo.TRAINABLE, "all"], default=None,
                   help="model to train (omit with --write-subset to train nothing)")
    p.add_argument("--epochs", type=int, default=None, help="default: per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak OneCycle LR; default: per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-subset", action="store_true",
                   help=f"(re)write {data.SUBSET_PATH.relative_to(REPO)}")
    args = p.parse_args(argv)
    if args.model is None and not args.write_subset:
        p.error("give --model and/or --write-subset")

    torch.set_num_threads(args.threads)
    # Cheap on CPU for these ops; makes a rerun with the same seed bit-identical.
    torch.use_deterministic_algorithms(True)

    if args.write_subset:
        print(f"wrote {data.write_test_subset()}")
    names = list(zoo.TRAINABLE) if args.model == "all" else [args.model] if args.model else []
    for name in names:
        record = train(
            name,
            epochs=args.epochs or DEFAULTS[name]["epochs"],
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr or DEFAULTS[name]["lr"],
            optimizer=DEFAULTS[name]["optimizer"],
        )
        print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
