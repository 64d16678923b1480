"""One optimiser step of the real learner engine on a fixed batch; run under torchrun with 1 or N ranks.

Usage: torchrun --nproc_per_node N tests/helpers/ds_one_step.py MODEL_DIR OUT_FILE ZERO_STAGE
Rank 0 writes the updated parameters to OUT_FILE (torch.save).
"""
import sys

import numpy as np
import torch

from himac.learner.batch import Sample
from himac.learner.engine import PolicyEngine


def fixed_batch(vocab: int, n: int = 7) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p, r = int(rng.integers(20, 60)), int(rng.integers(2, 9))
        ids = rng.integers(3, vocab, p + r).astype(np.int64)
        out.append(Sample(ids, p, rng.normal(-1.5, 0.3, r).astype(np.float32),
                          np.full(r, rng.normal(), np.float32), np.ones(r, np.float32), 1.0))
    return out


def main() -> None:
    model, out_file, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = PolicyEngine(model, lr=1e-3, weight_decay=0.0, kl_beta=0.01,
                          deepspeed_config={"zero_optimization": {"stage": stage}})
    vocab = engine.module.config.vocab_size
    stats = engine.train_step(fixed_batch(vocab), clip_eps=0.2, objective="decoupled", cap=5.0, entropy_coef=0.0,
                              micro_batch_seqs=2)
    sd = engine.full_state_dict()
    if engine.rank == 0:
        torch.save({"params": {k: v.clone() for k, v in sd.items()}, "loss": stats.loss, "world": engine.world},
                   out_file)


if __name__ == "__main__":
    main()
