"""A PyTorch peer of the `semihard` row: pytorch-metric-learning on the same data and net.

    python -m benchmarks.pml_peer --config=experiments/configs/omniglot.py --workdir=DIR \
        --config.data.dir=PATH/TO/omniglot [--config.seed=S] [--optimizer=adam]

What is the same as `python -m experiments.omniglot` (it reads the same config file and
`--config.*` overrides): the dataset, split and subset (`smine_jax.data` + `train.subset_dataset`:
the same sample ids and uint8 image cache), input size and normalisation (28², one channel,
(x / 255 - mean) / std, whole image, no flip), the net (`model.depth` × [conv 3×3 `model.width`,
no bias + BatchNorm + ReLU + max pool 2×2], global average pool, linear to `model.embedding_dim`,
L2 normalisation; conv init Kaiming fan-out, head LeCun truncated normal, as the Flax model),
m-per-class batches of `train.inbatch_images` images (`train.samples_per_class` per class,
drawn by `data.m_per_class_batches`), the epoch (3 × N training images, as every variant), the
optimiser (SGD, momentum, coupled L2 weight decay on every parameter, lr halved every
`optimizer.lr_halve_every` epochs) and the evaluation (`metrics.evaluate` on the test split
every `train.eval_every` epochs and at the end, seed `config.seed`).

What differs is the library: pytorch-metric-learning's `TripletMarginMiner(type_of_triplets=
"semihard")` (every triplet of the batch with 0 < d(a,n) - d(a,p) <= margin, not one negative
per pair) and `TripletMarginLoss` (hinge averaged over the triplets with a non-zero loss). Margin
and distance default to those of our `semihard` variant: margin `config.loss.margin` (0.2) on
squared L2 distances of the unit embeddings (FaceNet's loss); `--distance=euclidean` gives
pytorch-metric-learning's default plain L2 distance. `--optimizer=adam` swaps in Adam
(`--adam_lr`, no weight decay, same halving schedule).

The workdir gets config.json (the config + a `peer` section), metrics.jsonl in the trainer's
record format (epoch, loss, training_error = share of the mined triplets with a non-zero loss,
seconds {embed, index, mine, train, eval, epoch} with embed / index / mine 0 as for our
in-batch variants, `miner_seconds` = the part of `train` spent in the miner,
train_images_per_second, `test`) and checkpoint.pt at the end of every epoch: rerunning the same
command resumes after the last completed epoch. torch uses `os.cpu_count()` threads.

torch and pytorch-metric-learning are optional (the `bench` extra); without them the script
exits with status 2 and the pip command.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

INSTALL_HINT = "pip install torch==2.13.0 pytorch-metric-learning"
EXIT_USAGE = 2
DEPENDENCIES = ("torch", "pytorch_metric_learning")
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "omniglot.py"
CHECKPOINT = "checkpoint.pt"
# Fields of the `peer` section that may change between a run and its resumption.
PEER_RESUMABLE = ("peer.threads", "peer.torch_version", "peer.pml_version")


def missing_dependencies() -> list[str]:
    """The optional packages the peer needs that do not import here."""
    missing = []
    for name in DEPENDENCIES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def missing_message(missing: list[str]) -> str:
    return (f"error: benchmarks/pml_peer.py needs {' and '.join(missing)} (the optional `bench` "
            f"extra): {INSTALL_HINT}")


def steps_per_epoch(num_train: int, batch_images: int) -> int:
    """Batches an epoch: 3 × N images, as the trainer's in-batch variants (one process)."""
    return math.ceil(3 * num_train / batch_images)


# ----------------------------------------------------------------------------------------------
# The torch pieces (built after the dependency check, so the module imports without torch).


def build_net(width: int, depth: int, embedding_dim: int, channels: int):
    """torch twin of `models.build_model` for small_conv with pooling "avg"."""
    import torch
    from torch import nn

    class SmallConvEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            layers, in_channels = [], channels
            for _ in range(depth):
                layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width, eps=1e-5, momentum=0.1), nn.ReLU(inplace=True),
                           nn.MaxPool2d(2, 2)]
                in_channels = width
            self.backbone = nn.Sequential(*layers)
            self.head = nn.Linear(width, embedding_dim)

        def forward(self, images):
            features = self.backbone(images).mean(dim=(2, 3))
            return nn.functional.normalize(self.head(features), p=2, dim=1)

    net = SmallConvEmbedding()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):  # Flax: variance_scaling(2, fan_out, normal)
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):  # Flax Dense: lecun_normal (truncated), bias 0
            std = math.sqrt(1.0 / module.in_features) / 0.87962566103423978
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(module.bias)
    return net.to(memory_format=torch.channels_last)


def to_tensor(images_u8: np.ndarray, mean: tuple, std: tuple):
    """uint8 [B, S, S, C] -> float32 [B, C, S, S] (channels-last memory), (x/255 - mean)/std."""
    import torch

    images = torch.from_numpy(np.array(images_u8, np.uint8)).permute(0, 3, 1, 2).float()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((images / 255.0 - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def make_optimizer(net, config, peer: dict):
    """(optimizer, scheduler): SGD as `train.make_optimizer` (torch's weight_decay is coupled
    L2, the Caffe convention; head learning rate × head_lr_multiplier) or Adam; the learning
    rate halves every `lr_halve_every` epochs (the scheduler steps once an epoch)."""
    import torch

    opt = config.optimizer
    head = list(net.head.parameters())
    backbone = list(net.backbone.parameters())
    if peer["optimizer"] == "sgd":
        lr = float(opt.learning_rate)
        groups = [{"params": backbone, "lr": lr},
                  {"params": head, "lr": lr * float(opt.head_lr_multiplier)}]
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=float(opt.momentum),
                                    weight_decay=float(opt.weight_decay),
                                    nesterov=bool(opt.nesterov))
    else:
        optimizer = torch.optim.Adam(backbone + head, lr=float(peer["adam_lr"]))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, int(opt.lr_halve_every), gamma=0.5)
    return optimizer, scheduler


def make_miner_and_loss(peer: dict):
    from pytorch_metric_learning import distances, losses, miners

    power = 2 if peer["distance"] == "squared" else 1
    distance = distances.LpDistance(normalize_embeddings=True, p=2, power=power)
    miner = miners.TripletMarginMiner(margin=peer["margin"], type_of_triplets="semihard",
                                      distance=distance)
    loss = losses.TripletMarginLoss(margin=peer["margin"], distance=distance)
    return miner, loss


def embed(net, images: np.ndarray, batch_size: int, mean, std) -> np.ndarray:
    """Eval-mode embeddings float32 [N, D] of every image, in order."""
    import torch

    net.eval()
    with torch.no_grad():
        rows = [net(to_tensor(images[start:start + batch_size], mean, std)).numpy()
                for start in range(0, len(images), batch_size)]
    return np.concatenate(rows).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The run.


def _peer_section(config, flags_values: dict) -> dict:
    import pytorch_metric_learning
    import torch

    margin = flags_values["margin"]
    return {"library": "pytorch-metric-learning", "optimizer": flags_values["optimizer"],
            "adam_lr": float(flags_values["adam_lr"]),
            "margin": float(config.loss.margin if margin is None else margin),
            "distance": flags_values["distance"],
            "miner": "TripletMarginMiner(type_of_triplets='semihard')",
            "loss": "TripletMarginLoss", "threads": int(flags_values["threads"]),
            "torch_version": torch.__version__, "pml_version": pytorch_metric_learning.__version__}


def _load_splits(config):
    from smine_jax import data, train

    dataset = data.build_dataset(config.data, progress=False)
    dataset = train.subset_dataset(dataset, max_classes=int(config.subset.max_classes),
                                   max_per_class=int(config.subset.max_per_class))
    splits = [data.load(config.data, split=name, dataset=dataset, progress=False)
              for name in ("train", "test")]
    return dataset, splits[0], splits[1]


def run(config, workdir: Path, peer: dict) -> dict:
    """Trains and evaluates the peer; returns the final test metrics."""
    import ml_collections
    import torch

    from smine_jax import data, fileio, logs, metrics, train

    train.check_config(config)  # ValueError naming config.<section>.<field>
    data_config = data.resolve_config(config.data)
    if data_config["crop_size"] != data_config["image_size"] or data_config["flip"]:
        raise ValueError("config.data: the peer implements the whole-image protocol of the "
                         "Omniglot config (crop_size == image_size, flip False)")
    if config.model.name != "small_conv" or config.model.pooling != "avg":
        raise ValueError("config.model: the peer implements small_conv with pooling 'avg'")
    torch.set_num_threads(peer["threads"])
    torch.manual_seed(int(config.seed))
    dataset, train_split, test_split = _load_splits(config)
    labels = np.asarray(train_split.labels, np.int64)
    batch_images = train.inbatch_images(config)
    steps = steps_per_epoch(len(train_split), batch_images)
    mean, std = data_config["mean"], data_config["std"]

    net = build_net(int(config.model.width), int(config.model.depth),
                    int(config.model.embedding_dim), data_config["channels"])
    optimizer, scheduler = make_optimizer(net, config, peer)
    miner, loss_fn = make_miner_and_loss(peer)

    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = workdir / CHECKPOINT
    resuming = checkpoint_path.is_file()
    record_config = ml_collections.ConfigDict({**config.to_dict(), "peer": peer})
    counts = {"dataset": dataset.counts(),
              "train": {"images": len(train_split), "classes": int(train_split.num_classes)},
              "test": {"images": len(test_split), "classes": int(test_split.num_classes)}}
    logs.prepare_workdir(workdir, record_config, resuming=resuming,
                         resumable_fields=train.RESUMABLE_FIELDS + PEER_RESUMABLE,
                         dataset=counts)
    done = 0
    if resuming:
        saved = torch.load(checkpoint_path, weights_only=False)
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        done = int(saved["epoch"])
    log = logs.MetricsLog(workdir / "metrics.jsonl")
    log.truncate(done)

    epochs = int(config.train.epochs)
    final = None
    for epoch in range(done + 1, epochs + 1):
        epoch_started = time.perf_counter()
        rng = np.random.default_rng([int(config.seed), epoch])
        batches = data.m_per_class_batches(labels, batch_images,
                                           int(config.train.samples_per_class), seed=rng,
                                           num_batches=steps)
        learning_rate = optimizer.param_groups[0]["lr"]
        net.train()
        batch_losses, batch_errors, batch_triplets, miner_seconds = [], [], [], 0.0
        train_started = time.perf_counter()
        for ids in batches:
            images = to_tensor(data.gather(train_split.images, ids), mean, std)
            batch_labels = torch.from_numpy(labels[ids])
            embeddings = net(images)
            mine_started = time.perf_counter()
            triplets = miner(embeddings, batch_labels)
            miner_seconds += time.perf_counter() - mine_started
            loss = loss_fn(embeddings, batch_labels, triplets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            num_triplets = int(triplets[0].numel())
            batch_losses.append(float(loss.detach()))
            batch_triplets.append(num_triplets)
            batch_errors.append(_violating_share(embeddings.detach(), triplets, peer))
        train_seconds = time.perf_counter() - train_started
        scheduler.step()
        record = {
            "epoch": epoch, "step": epoch * steps, "loss": float(np.mean(batch_losses)),
            "training_error": float(np.mean(batch_errors)), "learning_rate": learning_rate,
            "mining": False, "kappa": None, "mined_fraction": 0.0,
            "triplets_per_batch": float(np.mean(batch_triplets)),
            "miner_seconds": miner_seconds,
            "seconds": {"embed": 0.0, "index": 0.0, "mine": 0.0, "train": train_seconds,
                        "eval": 0.0},
            "train_images_per_second": steps * batch_images / max(train_seconds, 1e-9),
        }
        if epoch % int(config.train.eval_every) == 0 or epoch == epochs:
            eval_started = time.perf_counter()
            embeddings = embed(net, test_split.images, int(config.train.embed_batch_size),
                               mean, std)
            final = {name: float(value) for name, value in metrics.evaluate(
                embeddings, np.asarray(test_split.labels), seed=int(config.seed)).items()}
            record["seconds"]["eval"] = time.perf_counter() - eval_started
            record["test"] = final
        record["seconds"]["epoch"] = time.perf_counter() - epoch_started
        state = {"net": net.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch}
        fileio.write_atomically(checkpoint_path, lambda handle, s=state: torch.save(s, handle))
        log.append(record)
        print(json.dumps({"epoch": epoch, "loss": record["loss"],
                          "seconds": record["seconds"],
                          "recall@1": final["recall@1"] if "test" in record else None}),
              flush=True)
    if final is None:  # nothing left to train: evaluate the restored net
        embeddings = embed(net, test_split.images, int(config.train.embed_batch_size), mean,
                           std)
        final = {name: float(value) for name, value in metrics.evaluate(
            embeddings, np.asarray(test_split.labels), seed=int(config.seed)).items()}
    return final


def _violating_share(embeddings, triplets, peer: dict) -> float:
    """Share of the mined triplets with a non-zero hinge (1.0 for an empty set: nothing
    satisfied), the peer's analogue of the trainer's training error."""
    import torch

    anchor, positive, negative = triplets
    if anchor.numel() == 0:
        return 1.0
    power = 2 if peer["distance"] == "squared" else 1
    d_ap = torch.linalg.vector_norm(embeddings[anchor] - embeddings[positive], dim=1) ** power
    d_an = torch.linalg.vector_norm(embeddings[anchor] - embeddings[negative], dim=1) ** power
    return float((d_ap - d_an + peer["margin"] > 0).float().mean())


# ----------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    # No default here: config_flags would apply the --config.* overrides while defining the
    # flag, outside the error handling of _parse; main() inserts the default file instead.
    config = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (default omniglot.py; omniglot.py:smoke).",
        lock_config=True)
    values = {
        "workdir": flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoint."),
        "optimizer": flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"],
                                       "sgd: the config's optimizer; adam: Adam, no decay."),
        "adam_lr": flags.DEFINE_float("adam_lr", 1e-3, "Adam's initial learning rate."),
        "margin": flags.DEFINE_float("margin", None, "Miner and loss margin (default: "
                                     "config.loss.margin)."),
        "distance": flags.DEFINE_enum("distance", "squared", ["squared", "euclidean"],
                                      "squared L2 (FaceNet, our semihard) or plain L2 (pml)."),
        "threads": flags.DEFINE_integer("threads", os.cpu_count() or 1, "torch threads."),
    }
    return config, values


def _usage_error(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _parse(argv):
    from absl import flags

    try:
        remaining = flags.FLAGS(argv)
        flags.FLAGS["config"].value.keys()  # config files load lazily: surface errors here
        return remaining
    except (AttributeError, KeyError) as error:
        _usage_error(f"--config: no such field {error} in the config")
    except (flags.Error, OSError, ValueError, TypeError) as error:
        _usage_error(str(error))
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> None:
    missing = missing_dependencies()
    if missing:
        print(missing_message(missing), file=sys.stderr)
        sys.exit(EXIT_USAGE)
    from absl import app

    config_flag, values = _define_flags()

    def _main(_):
        if not values["workdir"].value:
            _usage_error("--workdir: required (metrics.jsonl and the checkpoint go there)")
        config = config_flag.value
        if config.data.name != "omniglot":
            _usage_error(f"--config: the peer needs an omniglot config, got "
                         f"data.name={config.data.name!r}")
        peer = _peer_section(config, {name: flag.value for name, flag in values.items()})
        try:
            results = run(config, Path(values["workdir"].value), peer)
        except ValueError as error:
            _usage_error(str(error))
        print(json.dumps({"final_test_metrics": results}, sort_keys=True))

    argv = list(argv or sys.argv)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        argv.insert(1, f"--config={DEFAULT_CONFIG}")
    app.run(_main, argv=argv, flags_parser=_parse)


if __name__ == "__main__":
    main()
