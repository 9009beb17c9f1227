"""Train the CNN from Python: the notebook way. `python train.py [OUT_DIR]`."""

import sys

import kktrain
from cnn_task import CNNTask

result = kktrain.fit(
    CNNTask(),
    plugins=["ema", "early-stopping", "amp"],
    options={"amp.dtype": "bf16", "ema.decay": 0.99, "early-stopping.monitor": "val/acc"},
    out=sys.argv[1] if len(sys.argv) > 1 else "runs/cnn-python",
    quiet=True,
)
print(result.status, result.metrics["val/acc"], result.run_dir)
model = kktrain.load_model(result.run_dir, task=CNNTask())  # EMA weights, eval mode
