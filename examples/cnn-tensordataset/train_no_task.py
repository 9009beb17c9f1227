"""The same CNN with no task class at all: a model, two datasets, a loss, a metric."""

import sys

import torch.nn.functional as F
from torch.utils.data import TensorDataset

import kktrain
from cnn_task import SmallCNN, make_bars


def accuracy(logits, target):
    return {"acc": (logits.argmax(1) == target).float().mean()}


result = kktrain.fit(
    model=SmallCNN(), loss_fn=F.cross_entropy, metrics=accuracy,
    train_dataset=TensorDataset(*make_bars(2048, seed=0)), val_dataset=TensorDataset(*make_bars(512, seed=1)),
    options={"batch_size": 64, "max_steps": 200, "val_every": 50, "optimizer.lr": 3e-3},
    out=sys.argv[1] if len(sys.argv) > 1 else "runs/cnn-no-task", quiet=True,
)
print(result.status, result.metrics["val/acc"])
