"""Worker for tests/test_multiprocess.py: one process of a 2-process gloo run (torchrun).

``_mp_worker.py WORLD OUT JOB...``; each JOB is ``name:method:run_dir`` and is trained in turn:

* ``tokens``: 4 steps of KD (micro-batch 4, GA 2) recording, per micro-batch, the global and the
  local supervised-token counts.
* ``equal``: 4 steps of ``method`` (micro-batch 4, GA 2: 16 examples per step, as one process with
  micro-batch 4 and GA 4), this rank's final weights saved to ``OUT/{name}-rank{r}.pt``.
* ``guard``: 4 steps of KD where, on rank 1 only, step 2's micro-batches have no supervised token
  (the step's global count falls below ``min_supervised_tokens``) and step 3's teacher hidden
  states hold a NaN at one supervised position; the weights before/after each step and the guard
  state are saved per rank.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_world import make_cfg  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from slmkd import training as T  # noqa: E402
from slmkd.training.data import PaddingCollator  # noqa: E402

#: the guard job: supervised tokens a step needs. Examples have 43-48 supervised tokens, so a
#: full step (16 examples) has >= 688 and rank 0's half alone <= 384
GUARD_MIN_TOKENS = 560


class _Weights(TrainerCallback):
    """Every step's weights (after the step), and the final ones."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def _params(self):
        return {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}

    def on_train_begin(self, args, state, control, **kw):
        self.after[state.global_step] = self._params()

    def on_step_end(self, args, state, control, **kw):
        self.after[state.global_step] = self._params()


def _install(setup):
    orig_init = T.DistillationTrainer.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        setup(self)

    T.DistillationTrainer.__init__ = init
    return orig_init


def main(world: str, out: str, *jobs: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    out_dir = Path(out)
    for job in jobs:
        name, method, run_dir = job.split(":", 2)
        kind = name.split("-")[0]
        overrides = {"train.max_steps": 4, "train.batch_size": 4, "train.grad_accum_steps": 2}
        recorder: dict[str, _Weights] = {}
        seen: list[dict[str, int]] = []
        calls = {"collate": 0}
        base = T.get_method(method)
        if kind == "tokens":
            def loss(trainer, model, inputs, items, _base=base, _seen=seen):
                _seen.append({"global": int(items["supervised"]),
                             "local": int(T.default_count_items(inputs)["supervised"]),
                             "step": trainer.state.global_step + 1})
                return _base.compute_loss(trainer, model, inputs, items)

            method = f"{method}-recorded"
            T.register_method(T.MethodSpec(name=method, needs_teacher=base.needs_teacher,
                                           build_datasets=base.build_datasets, compute_loss=loss))
        elif kind == "guard":
            def make_collator(cfg, tok, _calls=calls):
                pad = PaddingCollator(tok.pad_token_id)

                def collate(features):
                    batch = pad(features)
                    _calls["collate"] += 1  # micro-batch c (0-based) belongs to step c // 2 + 1
                    if rank == 1 and (_calls["collate"] - 1) // 2 + 1 == 2:
                        batch["labels"][:] = -100
                    return batch

                return collate

            def build(cfg, records, tok, _base=base):  # examples filtered at the usual 8 tokens
                cfg = copy.deepcopy(cfg)
                cfg.train.min_supervised_tokens = 8
                return _base.build_datasets(cfg, records, tok)

            method = f"{method}-guarded"
            T.register_method(T.MethodSpec(name=method, needs_teacher=base.needs_teacher,
                                           build_datasets=build,
                                           compute_loss=base.compute_loss,
                                           make_collator=make_collator))
            overrides["train.min_supervised_tokens"] = GUARD_MIN_TOKENS
            overrides["train.weight_decay"] = 0.1

        def setup(tr, _kind=kind, _recorder=recorder):
            rec = _Weights(tr)
            tr.add_callback(rec)
            _recorder["w"] = rec
            _recorder["trainer"] = tr
            if _kind == "guard" and rank == 1:
                labels = {}
                orig = tr.compute_loss

                def compute_loss(model, inputs, *a, **kw):
                    labels["y"] = inputs["labels"]
                    return orig(model, inputs, *a, **kw)

                tr.compute_loss = compute_loss

                def hook(_mod, _inp, o):
                    if tr.state.global_step + 1 != 3:
                        return None
                    t = int((labels["y"][0, 1:] != -100).nonzero()[0])
                    o = o.clone()
                    o[0, t] = float("nan")
                    return o

                tr.teacher.model.norm.register_forward_hook(hook)

        orig_init = _install(setup)
        try:
            res = T.train(make_cfg(world, **overrides), method, "student_small", 1,
                          run_dir=run_dir)
        finally:
            T.DistillationTrainer.__init__ = orig_init
        rec = recorder["w"]
        if kind == "tokens":
            (out_dir / f"{name}-rank{rank}.json").write_text(
                json.dumps({"seen": seen, "summary": res.summary}))
        else:
            guard = recorder["trainer"].guard.to_dict()
            torch.save({"after": rec.after, "guard": guard, "summary": res.summary},
                       out_dir / f"{name}-rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
