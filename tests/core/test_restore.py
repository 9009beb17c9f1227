"""Trainer.snapshot/restore: state goes back, history stays, the skipped batch is never seen again."""

from __future__ import annotations

import torch

from kktrain import hookimpl


class RollbackAt:
    """Snapshot after step 3; log an event at 5; restore at 6 skipping step 6's batch."""

    name = "rollback-at"

    def __init__(self) -> None:
        self.snap = None
        self.params_at_3: list[torch.Tensor] = []
        self.seen: list[list[int]] = []
        self.restored = False

    @hookimpl(tryfirst=True)
    def forward_loss(self, trainer, batch):
        self.seen.append(list(trainer.data.last_positions[0]))

    @hookimpl
    def on_step(self, trainer, loss):
        step = trainer.state.step
        if step == 3 and self.snap is None:
            self.snap = trainer.snapshot()
            self.params_at_3 = [p.detach().clone() for p in trainer.model.parameters()]
        if step == 5:
            trainer.log_event("marker")
        if step == 6 and not self.restored:
            self.restored = True
            trainer.restore(self.snap, keep_plugins=(self.name,), skip_last_step=True)
            assert trainer.state.step == 3
            assert all(torch.equal(a, b) for a, b in zip(self.params_at_3, trainer.model.parameters()))


def test_restore_goes_back_keeps_history_and_skips_the_last_batch(kktrain_run) -> None:
    plugin = RollbackAt()
    out = kktrain_run(plugins=[plugin], steps=8, **{"data.shuffle": False})
    state = out.final_payload()["state"]
    assert state["step"] == 8 and state["skip_batches"] == [[0, 5]]
    # Step 5 ran twice (before the rollback and in the replay): both are in the kept history;
    # a restore that dropped history would leave only the replay's marker.
    assert [e["event"] for e in state["events"]].count("marker") == 2
    # Batches 0-5 (steps 1-6), then back to after batch 2: batch 5 is skipped for good.
    assert [pos for _, pos in plugin.seen] == [0, 1, 2, 3, 4, 5, 3, 4, 6, 7, 8]


def test_resume_after_a_restore_is_exact(assert_resume_equivalent) -> None:
    assert_resume_equivalent(plugins=lambda: [RollbackAt()], steps=10, cut=7, options={"data.workers": 2})
