"""Worker for tests/test_multiprocess.py: one process of a 2-process gloo run (torchrun)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_world import make_cfg  # noqa: E402

from slmkd import training as T  # noqa: E402


def main(world: str, run_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    seen: list[dict[str, int]] = []
    base = T.get_method("kd")

    def loss(trainer, model, inputs, items):
        seen.append({"global": int(items["supervised"]),
                     "local": int(T.default_count_items(inputs)["supervised"]),
                     "step": trainer.state.global_step + 1})
        return base.compute_loss(trainer, model, inputs, items)

    T.register_method(T.MethodSpec(name="kd-recorded", needs_teacher=True,
                                   build_datasets=base.build_datasets, compute_loss=loss))
    cfg = make_cfg(world, **{"train.max_steps": 4, "train.batch_size": 4,
                             "train.grad_accum_steps": 2})
    res = T.train(cfg, "kd-recorded", "student_small", 1, run_dir=run_dir)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"seen": seen, "summary": res.summary}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
