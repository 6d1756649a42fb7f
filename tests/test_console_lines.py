"""Freeze lines, the reasons freezing waits and what measuring cost reach the console by default: Lightning, the HF
Trainer, a plain loop.

Each loop runs in a fresh interpreter, as a user's script would: logging set up by nothing but the libraries.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import torch
from torch import nn
from lightning_svcca import FreezePolicy
torch.manual_seed(0)
x, y = torch.randn(256, 8), torch.randint(0, 2, (256,))
x[y == 1] += 1.0  # a separable task: the loss falls
def make():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
policy = FreezePolicy(mode="schedule", schedule={"1": 2})
"""

LOOPS = {
    "plain loop": """
from lightning_svcca import SVCCAMonitor
model = make()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with SVCCAMonitor(model, probe=x[:128], layers=["1", "3"], freeze=policy, writers=None) as monitor:
    monitor.start()
    for epoch in range(1, 4):
        for i in range(0, 256, 32):
            loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            monitor.observe_loss(loss)
        monitor.measure(epoch=epoch, step=epoch * 8)
    monitor.finish(epoch=3, step=24)
    print("frozen:", monitor.frozen)
""",
    "Lightning": """
import pytorch_lightning as pl
from lightning_svcca import SVCCACallback
class Module(pl.LightningModule):
    def __init__(self):
        super().__init__(); self.net = make()
    def forward(self, inputs):
        return self.net(inputs)
    def training_step(self, batch, index):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
policy = FreezePolicy(mode="schedule", schedule={"net.1": 2})
callback = SVCCACallback(probe=x[:128], layers=["net.1", "net.3"], freeze=policy)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
quiet = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
trainer = pl.Trainer(callbacks=[callback], max_epochs=3, accelerator="cpu", logger=False, **quiet)
trainer.fit(Module(), loader)
print("frozen:", callback.frozen)
""",
    "HF Trainer": """
import tempfile
import transformers
from lightning_svcca.huggingface import SVCCATrainerCallback
class Model(nn.Module):
    def __init__(self):
        super().__init__(); self.net = make()
    def forward(self, inputs, labels=None):
        logits = self.net(inputs)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits} if loss is not None else {"logits": logits}
class Data(torch.utils.data.Dataset):
    def __len__(self): return 256
    def __getitem__(self, i): return {"inputs": x[i], "labels": y[i]}
policy = FreezePolicy(mode="schedule", schedule={"net.1": 2})
callback = SVCCATrainerCallback(probe={"inputs": x[:128]}, layers=["net.1", "net.3"], freeze=policy, writers=None)
with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        out, num_train_epochs=3, per_device_train_batch_size=32, learning_rate=0.1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )
    transformers.Trainer(model=Model(), args=args, train_dataset=Data(), callbacks=[callback]).train()
print("frozen:", callback.frozen)
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_freeze_is_one_line_on_the_console_by_default(loop, tmp_path):
    if loop == "HF Trainer":
        pytest.importorskip("transformers")
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(LOOPS[loop])
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "frozen: {" in result.stdout and "2}" in result.stdout, console[-2000:]
    freeze_lines = [line for line in console.splitlines() if "froze layer" in line]
    assert len(freeze_lines) == 1 and "at epoch 2" in freeze_lines[0], console[-2000:]
    # and what measuring cost, once, at the end: 4 measurements (the initial one and one per epoch)
    cost_lines = [line for line in console.splitlines() if "measuring took" in line]
    assert len(cost_lines) == 1 and "4 measurements" in cost_lines[0], console[-2000:]
