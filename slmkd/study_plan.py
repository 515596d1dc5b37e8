"""The study's budget before anything runs (``slmkd plan``): hours per stage, VRAM per run, local
disk and Drive peaks, and the Drive footprint once the study is complete.

Everything is arithmetic over the configuration, the planner's model specs (no Hub, no weights)
and one table of throughput and size constants, :data:`CONSTANTS`. Each constant names its source
and its kind:

``measured``
    measured on a device or on the data (``benchmarks/RESULTS.md``; token counts with the Qwen2
    tokenizer over ``shared/data``), named with the device and date;
``derived``
    computed from measured figures by a stated rule (an A100 figure from an H200 one by the ratio
    of memory bandwidths for decoding, of FLOP peaks for compute-bound work);
``assumed``
    nothing was measured: an estimate, with its reasoning (e.g. a training step at 6·N FLOPs per
    token at an assumed MFU);
``spec``
    a vendor datasheet or a dataset's size.

Benchmarks update :data:`CONSTANTS` (same names) when they measure something.

The storage policy modelled (``slmkd.trainer``):

* a checkpoint is written locally every ``cfg.train.save_every_minutes`` (30) of training and
  copied to Drive; each side keeps at most one resumable checkpoint per run, the new one verified
  before the old is removed (transient: two);
* a checkpoint is the fp32 master weights + the optimizer states (AdamW: 8 B/param; bitsandbytes
  8-bit AdamW: 2 B/param, 8 B/param for the ``nn.Embedding`` the Trainer keeps in 32 bit) + small
  files; with LoRA the adapter and its states only;
* a run's checkpoints are removed on both sides when it completes; ``final/`` (bf16) is saved
  locally, copied to Drive while the next run trains (``train.background_final_copy``; a notebook's
  last copy is waited for) and removed locally once verified. Drive keeps the finals;
* ``cfg.kd.teacher_source="cached"``: a one-off ``cache_teacher`` stage runs the teacher over the
  kept CoT once and stores its top-``cfg.kd.cache_top_k`` per supervised token (int32 id + bf16
  value, plus one fp32 normaliser per scheduled temperature); KD runs then load no teacher.

Runs are sequential in the notebooks' order: notebook 02 (``sft``, ``kd``) then 03 (the CasCoD
methods), each ``method → student (cfg.students order) → seed`` as ``slmkd.notebook.train_grid``.

Usage: ``print(plan_study_budget(load_config("a100-40g")).format())``; ``.exit_code``: bit 1 GPU,
2 local disk, 4 Drive."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slmkd.planner import (
    ModelSpec,
    TrainSetup,
    model_spec,
)

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

from slmkd.study_costs import (  # noqa: F401 - re-exported
    CONSTANTS,
    ESCALATION_TEACHER,
    EXIT_DISK,
    EXIT_DRIVE,
    EXIT_GPU,
    GB,
    KINDS,
    STAGES,
    Constant,
    GenCost,
    _interp_log2,
    _pad_factor,
    _stage_plan,
    const,
    device_for,
    expected_decode_steps,
    final_bytes_per_param,
    forward_vram_gib,
    generation_cost,
    generation_vram_gib,
    matmul_params,
    notebook_of,
    run_setup_seconds,
    set_constant,
    weight_bytes,
)


# -- budget objects -------------------------------------------------------------------------------
@dataclass
class RunBudget:
    """One training run: VRAM, hours and its storage."""

    method: str
    student: str
    seed: int
    notebook: str  # "02" | "03"
    vram_gib: float
    vram_limit_gib: float | None
    fits: bool
    hours: float
    checkpoint_gb: float
    final_gb: float
    checkpoints_written: int
    train_tokens: float
    teacher_hours: float
    floor_hours: float
    finals: int = 1  # cascod-2stage keeps stage1/final and stage2/adapter
    stage_hours: list[float] = field(default_factory=list)
    #: the later stages' saved results (cascod-2stage: stage2/adapter, with its lm_head copy)
    extra_final_gb: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "student": self.student, "seed": self.seed,
                "notebook": self.notebook, "vram_gib": round(self.vram_gib, 2),
                "vram_limit_gib": None if self.vram_limit_gib is None
                else round(self.vram_limit_gib, 2),
                "fits": self.fits, "hours": round(self.hours, 3),
                "checkpoint_gb": round(self.checkpoint_gb, 2), "final_gb": round(self.final_gb, 2),
                "finals": self.finals, "checkpoints_written": self.checkpoints_written,
                "train_tokens": int(self.train_tokens),
                "teacher_hours": round(self.teacher_hours, 3)}


@dataclass
class StudyBudget:
    """The study's budget; :meth:`to_json` for ``slmkd plan --json``, :meth:`format` for people."""

    profile: str
    device: str
    gpu_gib: float | None
    vram_limit_gib: float | None
    disk_free_gb: float
    drive_free_gb: float
    teacher: str
    teacher_precision: str
    teacher_source: str
    stage_hours: dict[str, float]
    stage_details: dict[str, str]
    runs: list[RunBudget]
    local_peak_gb: float
    local_peak_parts: dict[str, float]
    drive_peak_gb: float
    drive_peak_at: str
    drive_final_gb: float
    drive_final_parts: dict[str, float]
    teacher_vram_gib: dict[str, float]
    eval_vram_gib: dict[str, float]
    floor_hours: float
    gap_hours: dict[str, float]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exit_bits: int = 0
    escalation: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_hours(self) -> float:
        return sum(self.stage_hours.values())

    @property
    def fits(self) -> bool:
        return self.exit_bits == 0

    @property
    def exit_code(self) -> int:
        """0 when everything fits; else bits: 1 GPU, 2 local disk, 4 Drive."""
        return self.exit_bits

    def to_json(self) -> dict[str, Any]:
        total = self.total_hours
        return {
            "profile": self.profile, "device": self.device, "gpu_gib": self.gpu_gib,
            "vram_limit_gib": self.vram_limit_gib, "disk_free_gb": round(self.disk_free_gb, 1),
            "drive_free_gb": round(self.drive_free_gb, 1),
            "teacher": self.teacher, "teacher_precision": self.teacher_precision,
            "teacher_source": self.teacher_source,
            "total_hours": round(total, 3),
            "stage_hours": {k: round(v, 3) for k, v in self.stage_hours.items()},
            "stage_share": {k: round(v / total, 3) if total else 0.0
                            for k, v in self.stage_hours.items()},
            "stage_details": dict(self.stage_details),
            "floor_hours": round(self.floor_hours, 3),
            "gap_to_floor_hours": {k: round(v, 3) for k, v in self.gap_hours.items()},
            "local_peak_gb": round(self.local_peak_gb, 2),
            "local_peak_parts_gb": {k: round(v, 2) for k, v in self.local_peak_parts.items()},
            "drive_peak_gb": round(self.drive_peak_gb, 2), "drive_peak_at": self.drive_peak_at,
            "drive_final_gb": round(self.drive_final_gb, 2),
            "drive_final_parts_gb": {k: round(v, 3) for k, v in self.drive_final_parts.items()},
            "teacher_vram_gib": {k: round(v, 2) for k, v in self.teacher_vram_gib.items()},
            "eval_vram_gib": {k: round(v, 2) for k, v in self.eval_vram_gib.items()},
            "fits": self.fits, "exit_code": self.exit_code, "problems": list(self.problems),
            "notes": list(self.notes),
            "runs": [r.to_json() for r in self.runs],
            "escalation": list(self.escalation),
            "constants": [c.to_json() for c in CONSTANTS.values()],
        }

    def _run_groups(self) -> list[tuple[str, str, list[RunBudget]]]:
        groups: dict[tuple[str, str], list[RunBudget]] = {}
        for r in self.runs:
            groups.setdefault((r.method, r.student), []).append(r)
        return [(m, s, rs) for (m, s), rs in groups.items()]

    def summary_line(self) -> str:
        """One line for the notebooks after 00: total hours, Drive peak/final, fits or not."""
        verdict = "fits" if self.fits else "DOES NOT FIT: " + "; ".join(self.problems)
        return (f"plan ({self.profile}): {self.total_hours:.1f} h in all, Drive peak "
                f"{self.drive_peak_gb:.1f} GB, {self.drive_final_gb:.1f} GB after completion, "
                f"local peak {self.local_peak_gb:.1f} GB; {verdict} (details: notebook 00 / "
                "`slmkd plan`)")

    def format(self) -> str:
        total = self.total_hours
        gpu = (f"{self.gpu_gib:.1f} GiB card, runs must stay ≤ {self.vram_limit_gib:.1f} GiB"
               if self.gpu_gib is not None else "no GPU check")
        lines = [
            f"slmkd plan — profile {self.profile}: {self.device} ({gpu}); local disk "
            f"{self.disk_free_gb:.0f} GB free; Drive {self.drive_free_gb:.0f} GB free",
            f"  teacher {self.teacher} ({self.teacher_precision}, KD from a {self.teacher_source} teacher)",
            "",
            f"  {'stage':<15}{'hours':>7}{'share':>7}  detail",
        ]
        for k, v in self.stage_hours.items():
            share = f"{100 * v / total:5.0f}%" if total else "    -"
            lines.append(f"  {k:<15}{v:7.2f}{share:>7}  {self.stage_details.get(k, '')}")
        lines.append(f"  {'total':<15}{total:7.2f}{'':>7}  compute floor {self.floor_hours:.2f} h "
                     f"(gap {total - self.floor_hours:.2f} h: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in self.gap_hours.items() if v > 0.005)
                     + ")")
        lines += ["", f"  {'run kind':<38}{'n':>3}{'VRAM GiB':>10}{'fits':>6}{'h/run':>7}"
                      f"{'ckpt GB':>9}{'final GB':>10}"]
        for m, s, rs in self._run_groups():
            r = rs[0]
            lines.append(f"  {m + ' ' + s:<38}{len(rs):3d}{r.vram_gib:10.1f}"
                         f"{'yes' if all(x.fits for x in rs) else 'NO':>6}"
                         f"{sum(x.hours for x in rs) / len(rs):7.2f}{r.checkpoint_gb:9.1f}"
                         f"{r.final_gb + r.extra_final_gb:10.1f}")
        if self.teacher_vram_gib:
            lines.append("  teacher VRAM GiB: " + ", ".join(
                f"{k} {v:.1f}" for k, v in self.teacher_vram_gib.items()))
        if self.eval_vram_gib:
            lines.append("  evaluation VRAM GiB: " + ", ".join(
                f"{k} {v:.1f}" for k, v in self.eval_vram_gib.items()))
        lines += [
            "",
            f"  local disk peak {self.local_peak_gb:.1f} GB (" + ", ".join(
                f"{k} {v:.1f}" for k, v in self.local_peak_parts.items()) + ")",
            f"  Drive peak {self.drive_peak_gb:.1f} GB ({self.drive_peak_at})",
            f"  Drive after completion {self.drive_final_gb:.1f} GB (" + ", ".join(
                f"{k} {v:.1f}" for k, v in self.drive_final_parts.items()) + ")",
        ]
        for e in self.escalation:
            lines.append(f"  escalation: {e['teacher']} ({e['precision']}): study "
                         f"{e['total_hours']:.2f} h, teacher VRAM GiB "
                         + ", ".join(f"{k} {v:.1f}" for k, v in e["teacher_vram_gib"].items())
                         + ("; fits" if e["fits"] else
                            f"; {len(e['problems'])} problem(s), e.g. {e['problems'][0]}"))
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  " + ("everything fits" if self.fits else "DOES NOT FIT:"))
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


# -- the plan -------------------------------------------------------------------------------------
def _eval_items(cfg: ExperimentConfig, dataset: str) -> int:
    ev = cfg.evaluation
    if dataset == "gsm8k":
        n = int(const("gsm8k_test_items"))
        if cfg.is_tiny:
            n = cfg.tiny.num_test
        return n if ev.gsm8k_limit is None else min(n, ev.gsm8k_limit)
    if ev.bbh_limit is None:
        return int(const("bbh_items"))
    return int(const("bbh_tasks")) * ev.bbh_limit  # every BBH task has > 100 items


def _train_items(cfg: ExperimentConfig) -> int:
    n = cfg.tiny.num_train if cfg.is_tiny else int(const("gsm8k_train_items"))
    lim = cfg.generation.limit
    return n if lim is None else min(n, int(lim))


def _backend(backend: str) -> str:
    """The backend the plan assumes: ``"auto"`` is vLLM (the notebooks' install cell installs
    the vLLM release built for Colab's torch; without one the HF figures apply: plan with
    ``generation.backend`` / ``evaluation.backend`` = ``"hf"``)."""
    return "vllm" if backend == "auto" else backend


def plan_study_budget(cfg: ExperimentConfig, *, gpu_gib: float | None = None,
                      disk_free_gb: float | None = None, drive_free_gb: float | None = None,
                      methods: list[str] | None = None, escalation: bool = True) -> StudyBudget:
    """The study's budget for ``cfg``: hours per stage, VRAM per run, storage peaks.

    Args:
        gpu_gib: the card's memory (default the profile's: 79.2 / 39.4 GiB); a run fits when
            the planner's total ≤ ``gpu_gib − vram_margin_gib``.
        disk_free_gb: free local disk (default the Colab A100 VM: 235.7 GB − ~35 GB image).
        drive_free_gb: free Drive space (default 100 GB).
        methods: default ``cfg.methods``.
        escalation: also plan the 14B-teacher variants (bf16 and 4-bit), as information.
    """
    dev = device_for(cfg.profile, gpu_gib)
    limit = None if dev.gpu_gib is None else dev.gpu_gib - const("vram_margin_gib")
    disk = (const("colab_disk_total_gb") - const("colab_disk_image_used_gb")
            if disk_free_gb is None else float(disk_free_gb))
    drive = const("drive_quota_gb") if drive_free_gb is None else float(drive_free_gb)
    methods = list(methods or cfg.methods)
    order = [m for m in methods if notebook_of(m) == "02"] + \
            [m for m in methods if notebook_of(m) == "03"]
    tr, kd = cfg.train, cfg.kd
    source = str(getattr(kd, "teacher_source", "live") or "live")
    top_k = int(getattr(kd, "cache_top_k", 64) or 64)
    save_every_s = float(getattr(tr, "save_every_minutes", 30.0) or 30.0) * 60
    four_bit = bool(cfg.models.teacher_load_in_4bit)
    teacher = model_spec(cfg.teacher, cfg)
    students = {s: model_spec(cfg.student_name(s), cfg) for s in cfg.students}
    tiny = cfg.is_tiny
    problems: list[str] = []
    notes: list[str] = []
    bits = 0

    n_items = _train_items(cfg)
    n_kept = n_items * (1.0 if tiny else const("cot_keep_fraction"))
    prompt_mean = const("gsm8k_prompt_tokens_mean")
    comp_mean = const("cot_completion_tokens_mean")
    if tiny:
        prompt_mean, comp_mean = 40.0, 20.0
    row_mean = prompt_mean + comp_mean
    uses_kd = any(m in ("kd", "cascod-kd") for m in methods)
    cached = source == "cached" and uses_kd
    stage_hours = dict.fromkeys(STAGES, 0.0)
    details: dict[str, str] = {}
    floor_s = 0.0
    gap: dict[str, float] = {"train padding": 0.0, "train MFU below floor": 0.0,
                             "teacher forwards": 0.0, "generation (HF decode, bucket tails)": 0.0,
                             "loads, saves, copies": 0.0}

    def load_s(spec: ModelSpec, bf16: bool = True, first: bool = False) -> float:
        size = weight_bytes(spec) / GB
        s = size / const("model_load_gbps") * (1 if bf16 else 2)
        return s + (size / const("hub_download_gbps") if first else 0.0)

    # -- 01: teacher CoT --------------------------------------------------------------------------
    gen = cfg.generation
    if tiny:
        cot_s = const("tiny_cot_s") + const("tiny_world_s")
        details["cot"] = "tiny world + tiny teacher CoT (2-core CPU calibration)"
    else:
        g = generation_cost(teacher, n_items, gen.batch_size, prompt_mean, comp_mean,
                            gen.max_new_tokens, dev, four_bit, _backend(gen.backend))
        extra = load_s(teacher, first=True) + (const("vllm_engine_start_s")
                                               if _backend(gen.backend) == "vllm" else 0.0)
        cot_s = g.seconds + extra
        floor_s += g.floor_seconds
        gap["generation (HF decode, bucket tails)"] += g.seconds - g.floor_seconds
        gap["loads, saves, copies"] += extra
        tps = g.generated_tokens / max(g.seconds, 1e-9)
        details["cot"] = (f"{teacher.name}{' 4-bit' if four_bit else ''}: {n_items:,} items, "
                          f"{_backend(gen.backend)}, batch {gen.batch_size}, ~{comp_mean:.0f} tokens each "
                          f"(~{tps:,.0f} useful tokens/s)")
    stage_hours["cot"] = cot_s / 3600

    # -- cache_teacher ----------------------------------------------------------------------------
    cache_gb = 0.0
    probe = TrainSetup(cache_top_k=top_k, cache_temperatures=max(1, len(kd.temperature_schedule)))
    if cached:
        sup_tokens = n_kept * comp_mean
        cache_gb = sup_tokens * probe.cache_bytes_per_token / GB
        if tiny:
            cs = const("tiny_cot_s")
        else:
            rows = int(const("cache_batch_rows"))
            tokens = n_kept * row_mean * _interp_log2("row_pad_b", rows)
            fwd = tokens * 2 * matmul_params(teacher) / (
                const("teacher_forward_mfu") * dev.flops
                * (const("teacher_4bit_forward_factor") if four_bit else 1.0))
            extra = load_s(teacher) + cache_gb / const("drive_write_gbps")
            cs = fwd + extra
            gap["teacher forwards"] += fwd
            gap["loads, saves, copies"] += extra
        stage_hours["cache_teacher"] = cs / 3600
        details["cache_teacher"] = (f"one teacher forward over {n_kept:,.0f} kept records; top-{top_k}"
                                    f" cache {cache_gb:.2f} GB")
    else:
        details["cache_teacher"] = "not used (kd.teacher_source='live')" if uses_kd else "no KD method"

    # -- 02/03: training --------------------------------------------------------------------------
    runs: list[RunBudget] = []
    final_bpp = final_bytes_per_param(cfg)
    bg_copy = not tiny and bool(getattr(cfg.train, "background_final_copy", False))
    cas = cfg.cascod
    for method in order:
        for skey in cfg.students:
            spec_s = students[skey]
            stages = ["cascod-stage1", "cascod-stage2"] if method == "cascod-2stage" else [method]
            plans = [_stage_plan(cfg, method, st, spec_s, final_bpp) for st in stages]
            setup = plans[0]["setup"]
            vram = max(pl["est"].total_gib for pl in plans)
            fits = tiny or limit is None or vram <= limit
            ckpt_gb = max(pl["ckpt_gb"] for pl in plans)
            final_gb = plans[0]["final_gb"]
            extra_final_gb = sum(pl["final_gb"] for pl in plans[1:])
            bg = bg_copy and len(stages) == 1
            for seed in cfg.seeds:
                s_total, t_total, fl_total, tok_total, saves = 0.0, 0.0, 0.0, 0.0, 0
                stage_h: list[float] = []
                for pl in plans:
                    setup = pl["setup"]
                    rows = setup.rows_per_example
                    pad = _pad_factor(cfg, setup.batch_size)
                    examples = pl["epochs"] * n_kept
                    if pl["max_steps"] and pl["max_steps"] > 0:
                        examples = min(examples, pl["max_steps"] * tr.batch_size * tr.grad_accum_steps)
                    tokens = examples * rows * row_mean * pad
                    if tiny:
                        key = ("tiny_train_kd_s" if method == "kd" else "tiny_train_cascod_s"
                               if method in ("cascod", "cascod-kd") else "tiny_train_s")
                        compute, teach, fl = const(key) * (pl["epochs"] / tr.epochs if pl[
                            "stage"] == "cascod-stage1" else 1), 0.0, 0.0
                        overhead = 0.0
                    else:
                        f_s = (4 if setup.lora else 6) * matmul_params(spec_s)
                        compute = tokens * f_s / (const("train_mfu") * dev.flops)
                        teach = 0.0
                        if setup.loads_teacher:
                            t_tokens = examples * row_mean * pad
                            teach = t_tokens * 2 * matmul_params(teacher) / (
                                const("teacher_forward_mfu") * dev.flops
                                * (const("teacher_4bit_forward_factor") if four_bit else 1.0))
                        fl = examples * rows * row_mean * 6 * matmul_params(spec_s) / (
                            const("floor_mfu") * dev.flops)
                        gap["train padding"] += compute * (1 - 1 / pad)
                        gap["train MFU below floor"] += compute / pad - fl
                        gap["teacher forwards"] += teach
                        n_saves = int((compute + teach) // save_every_s)
                        saves += n_saves
                        overhead = (run_setup_seconds(setup.method) + load_s(spec_s, bf16=setup.lora)
                                    + (load_s(teacher, bf16=not four_bit)
                                       if setup.loads_teacher else 0.0)
                                    + n_saves * pl["ckpt_gb"] / const("local_write_gbps")
                                    + pl["final_gb"] / const("local_write_gbps")
                                    + (0.0 if bg else pl["final_gb"] / const("drive_write_gbps")))
                        gap["loads, saves, copies"] += overhead
                        if pl["stage"] == "cascod-stage2" and cas.stage2_student_rationale_fraction:
                            # stage-1 student rationales, decoded like the evaluator
                            gb = _backend(cfg.evaluation.backend)
                            g = generation_cost(
                                spec_s, int(round(n_kept * cas.stage2_student_rationale_fraction)),
                                cfg.evaluation.batch_size, prompt_mean, comp_mean,
                                cfg.evaluation.max_new_tokens, dev, False, gb)
                            overhead += g.seconds + (const("vllm_engine_start_s") + load_s(spec_s)
                                                     if gb == "vllm" else 0.0)
                            floor_s += g.floor_seconds
                            gap["generation (HF decode, bucket tails)"] += (g.seconds
                                                                            - g.floor_seconds)
                    s_total += compute + teach + overhead
                    t_total += teach
                    fl_total += fl
                    tok_total += tokens
                    stage_h.append((compute + teach + overhead) / 3600)
                    if tiny:
                        saves += int(compute // save_every_s)
                floor_s += fl_total
                runs.append(RunBudget(
                    method=method, student=spec_s.name, seed=int(seed), notebook=notebook_of(method),
                    vram_gib=vram, vram_limit_gib=limit, fits=fits, hours=s_total / 3600,
                    checkpoint_gb=ckpt_gb, final_gb=final_gb, checkpoints_written=saves,
                    train_tokens=tok_total, teacher_hours=t_total / 3600,
                    floor_hours=fl_total / 3600, finals=len(stages), stage_hours=stage_h,
                    extra_final_gb=extra_final_gb))
    for nb in ("02", "03"):  # a background final/ copy overlaps the next run; the grid's last waits
        last = [r for r in runs if r.notebook == nb][-1:]
        if bg_copy and last and last[0].finals == 1:
            last[0].hours += last[0].final_gb / const("drive_write_gbps") / 3600
            gap["loads, saves, copies"] += last[0].final_gb / const("drive_write_gbps")
    par = max(1, int(cfg.parallel_runs)) if tiny else 1  # tiny: runs share parallel workers
    for r in runs:
        stage_hours["train_" + r.notebook] += r.hours / par
    for nb in ("02", "03"):
        rs = [r for r in runs if r.notebook == nb]
        details["train_" + nb] = (f"{len(rs)} runs: " + ", ".join(sorted({r.method for r in rs}))
                                  if rs else "no run")
    seen: set[tuple[str, str]] = set()
    for r in runs:
        if not r.fits and r.vram_limit_gib is not None and (r.method, r.student) not in seen:
            seen.add((r.method, r.student))
            n = sum(1 for x in runs if (x.method, x.student) == (r.method, r.student))
            problems.append(
                f"GPU: {r.method} {r.student} ({n} run{'s' if n > 1 else ''}) needs "
                f"{r.vram_gib:.1f} GiB, the limit is {r.vram_limit_gib:.1f} GiB "
                f"({dev.gpu_gib:.1f} GiB card − {const('vram_margin_gib'):.1f} margin): short by "
                f"{r.vram_gib - r.vram_limit_gib:.1f} GiB")
            bits |= EXIT_GPU

    # -- 04: evaluation ---------------------------------------------------------------------------
    ev = cfg.evaluation
    targets: list[tuple[str, ModelSpec, bool, bool]] = []  # label, spec, 4-bit, cascod
    for skey in cfg.students:  # evaluate_study's order: a base, its runs; the teacher last
        st = students[skey]
        targets.append((f"base {st.name}", st, False, False))
        targets += [(f"{r.method} {r.student} seed {r.seed}", st, False,
                     r.method.startswith("cascod")) for r in sorted(
                         runs, key=lambda r: (r.method, r.seed)) if r.student == st.name]
    targets.append((f"teacher {teacher.name}", teacher, four_bit, False))
    hf_labels = {t[0] for t in targets if t[0].startswith("cascod-2stage ")  # vLLM cannot
                 and cfg.cascod.stage2_train_lm_head}  # serve an adapter's lm_head copy: HF
    eval_s = 0.0
    eval_items_total = engine_starts = 0
    ds_stats = {"gsm8k": (const("gsm8k_prompt_tokens_mean"), comp_mean,
                          const("gsm8k_prompt_tokens_max")),
                "bbh": (const("bbh_prompt_tokens_mean"), const("bbh_completion_tokens_mean"),
                        const("bbh_prompt_tokens_max"))}
    served = None  # what the open vLLM engine serves: the next model of its shape is reloaded
    for label, spec, q4, cascod in targets:
        if tiny:
            eval_s += const("tiny_eval_s") * len(ev.datasets) * (3 if cascod else 1)
            continue
        backend = "hf" if label in hf_labels else _backend(ev.backend)
        start = backend == "vllm" and (served is not spec or q4)
        extra = load_s(spec) + (const("vllm_engine_start_s") if start else 0.0)
        served = spec if backend == "vllm" and not q4 else None
        engine_starts += start
        cost = GenCost(0.0, 0.0, 0.0)
        for ds in ev.datasets:
            n = _eval_items(cfg, ds)
            eval_items_total += n
            p_mean, c_mean, _ = ds_stats[ds]
            cost = cost + generation_cost(spec, n, ev.batch_size, p_mean, c_mean,
                                          ev.max_new_tokens, dev, q4, backend)
            if cascod:  # the cascaded answer pass, and error propagation's teacher-rationale pass
                for _ in range(2):
                    ans = const("cascod_answer_steps")
                    cost = cost + generation_cost(spec, n, ev.batch_size, p_mean + c_mean, ans,
                                                  int(ans), dev, q4, backend)
        eval_s += cost.seconds + extra
        floor_s += cost.floor_seconds
        gap["generation (HF decode, bucket tails)"] += cost.seconds - cost.floor_seconds
        gap["loads, saves, copies"] += extra
    stage_hours["evaluate_04"] = eval_s / 3600 / par
    details["evaluate_04"] = (f"{len(targets)} models x {', '.join(ev.datasets)} "
                              f"({_eval_items(cfg, 'gsm8k') if 'gsm8k' in ev.datasets else 0} GSM8K"
                              + (f", {_eval_items(cfg, 'bbh')} BBH" if "bbh" in ev.datasets else "")
                              + f" items), {_backend(ev.backend)}"
                              + (f" ({engine_starts} engine starts)" if engine_starts else "")
                              + f", batch {ev.batch_size}, max_new_tokens {ev.max_new_tokens}"
                              + "; CasCoD runs: + answer pass + error propagation")
    stage_hours["report_05"] = const("report_s") / 3600
    details["report_05"] = "tables, paired statistics, plots"
    gap["loads, saves, copies"] += const("report_s")

    # -- GPU memory outside training --------------------------------------------------------------
    teacher_vram: dict[str, float] = {}
    eval_vram: dict[str, float] = {}
    if not tiny:
        teacher_vram["cot"] = generation_vram_gib(
            teacher, gen.batch_size, int(const("gsm8k_prompt_tokens_max")) + gen.max_new_tokens,
            four_bit)
        if cached:
            teacher_vram["cache_teacher"] = forward_vram_gib(
                teacher, int(const("cache_batch_rows")), tr.max_seq_length, four_bit)
        ctx = max(int(ds_stats[d][2]) for d in ev.datasets) + ev.max_new_tokens
        teacher_vram["evaluate"] = generation_vram_gib(teacher, ev.batch_size, ctx, four_bit)
        for spec in students.values():
            eval_vram[spec.name] = generation_vram_gib(spec, ev.batch_size, ctx)
        cot_ctx = int(const("gsm8k_prompt_tokens_max")) + gen.max_new_tokens
        checks = [("cot", teacher, gen.batch_size, cot_ctx, four_bit, teacher_vram["cot"]),
                  ("evaluate", teacher, ev.batch_size, ctx, four_bit, teacher_vram["evaluate"])]
        checks += [(f"evaluate {spec.name}", spec, ev.batch_size, ctx, False, eval_vram[spec.name])
                   for spec in students.values()]
        for what, spec, batch, context, q4, v in checks:
            if limit is None or v <= limit:
                continue
            ok = next((b for b in (256, 192, 128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1)
                       if b < batch and generation_vram_gib(spec, b, context, q4) <= limit), None)
            hint = f"batch {ok} fits" if ok else "no batch fits"
            if spec is teacher and not q4:
                hint += ", or load the teacher in 4-bit"
            problems.append(f"GPU: {what} ({spec.name}{' 4-bit' if q4 else ''}, batch {batch}, "
                            f"{context}-token context) needs {v:.1f} GiB, the limit is "
                            f"{limit:.1f} GiB: short by {v - limit:.1f} GiB ({hint})")
            bits |= EXIT_GPU
        if "cache_teacher" in teacher_vram and limit is not None \
                and teacher_vram["cache_teacher"] > limit:
            problems.append(f"GPU: cache_teacher ({teacher.name}) needs "
                            f"{teacher_vram['cache_teacher']:.1f} GiB, the limit is {limit:.1f} "
                            f"GiB: short by {teacher_vram['cache_teacher'] - limit:.1f} GiB")
            bits |= EXIT_GPU
        if four_bit:
            notes.append("the teacher runs in 4-bit NF4 for the CoT, "
                         + ("the cache" if cached else "the live KD") + " and its evaluation "
                         "(one precision throughout)")

    # -- storage ----------------------------------------------------------------------------------
    cot_gb = n_items * const("cot_bytes_per_record") / GB
    eval_gb = eval_items_total * const("eval_bytes_per_item") / GB
    models = {teacher.name: teacher, **{s.name: s for s in students.values()}}
    hf_cache_gb = sum(weight_bytes(s) for s in models.values()) / GB
    local_run_peak, local_at = 0.0, "no run"
    drive_peak, drive_at = cot_gb + cache_gb, "after the CoT"
    finals_so_far, prev_copy = 0.0, 0.0
    for r in runs:
        # the run's hours are an estimate: storage must still fit if it takes twice as long, so a
        # run planned at more than half a checkpoint interval counts (at least) one checkpoint
        n_ck = max(r.checkpoints_written, int(2 * r.hours * 3600 >= save_every_s))
        transient = min(n_ck, 2) * r.checkpoint_gb
        at_end = min(n_ck, 1) * r.checkpoint_gb + r.final_gb
        run_peak = max(transient, at_end)
        if r.finals > 1:  # stage 1's final stays while stage 2 trains
            run_peak += r.final_gb
        if run_peak + prev_copy > local_run_peak:  # + the previous final/ still being copied
            local_run_peak, local_at = run_peak + prev_copy, f"{r.method} {r.student}"
        prev_copy = r.final_gb if bg_copy and r.finals == 1 else 0.0
        d = cot_gb + cache_gb + finals_so_far + run_peak
        if d > drive_peak:
            drive_peak = d
            drive_at = (f"during {r.method} {r.student} seed {r.seed}: {finals_so_far:.1f} GB of "
                        f"finals so far + {run_peak:.1f} GB of this run's checkpoints/final")
        finals_so_far += r.final_gb + r.extra_final_gb
    drive_final = finals_so_far + cot_gb + cache_gb + eval_gb
    if drive_final > drive_peak:
        drive_peak, drive_at = drive_final, "after the evaluation"
    local_parts = {"HF model cache": hf_cache_gb, f"run peak ({local_at})": local_run_peak}
    local_peak = hf_cache_gb + local_run_peak
    if local_peak > disk:
        problems.append(f"local disk: peak {local_peak:.1f} GB > {disk:.1f} GB free: short by "
                        f"{local_peak - disk:.1f} GB")
        bits |= EXIT_DISK
    if drive_peak > drive:
        problems.append(f"Drive: peak {drive_peak:.1f} GB > {drive:.1f} GB free: short by "
                        f"{drive_peak - drive:.1f} GB ({drive_at})")
        bits |= EXIT_DRIVE
    if disk_free_gb is None:
        notes.append(f"local disk assumed: Colab A100 VM, {const('colab_disk_total_gb'):.1f} GB "
                     f"disk, ~{const('colab_disk_image_used_gb'):.0f} GB used by the image")
    if drive_free_gb is None:
        notes.append(f"Drive assumed {drive:.0f} GB free (pass drive_free_gb / --drive-gb)")
    if not tiny:
        notes.append("A100 throughput: generation derived from the H200 measurements (bandwidth "
                     "ratio); training and teacher forwards assumed (MFU), no CUDA train step "
                     "measured yet")

    budget = StudyBudget(
        profile=cfg.profile, device=dev.name, gpu_gib=dev.gpu_gib, vram_limit_gib=limit,
        disk_free_gb=disk, drive_free_gb=drive, teacher=teacher.name,
        teacher_precision="fp32 (CPU)" if tiny else "4-bit NF4" if four_bit else "bf16",
        teacher_source=source if uses_kd else "live", stage_hours=stage_hours,
        stage_details=details, runs=runs, local_peak_gb=local_peak, local_peak_parts=local_parts,
        drive_peak_gb=drive_peak, drive_peak_at=drive_at, drive_final_gb=drive_final,
        drive_final_parts={"finals": finals_so_far, "CoT": cot_gb, "teacher cache": cache_gb,
                           "evaluation": eval_gb},
        teacher_vram_gib=teacher_vram, eval_vram_gib=eval_vram, floor_hours=floor_s / 3600,
        gap_hours={k: v / 3600 for k, v in gap.items()}, problems=problems, notes=notes,
        exit_bits=bits)
    if escalation and not tiny and model_spec(cfg.teacher, cfg).name != "Qwen2.5-14B-Instruct":
        for q4 in (False, True):
            alt = cfg.replace(**{"models.teacher_medium": ESCALATION_TEACHER,
                                 "models.teacher_load_in_4bit": q4})
            b = plan_study_budget(alt, gpu_gib=gpu_gib, disk_free_gb=disk_free_gb,
                                  drive_free_gb=drive_free_gb, methods=methods, escalation=False)
            budget.escalation.append({
                "teacher": b.teacher, "precision": b.teacher_precision,
                "total_hours": round(b.total_hours, 3),
                "stage_hours": {k: round(v, 3) for k, v in b.stage_hours.items()},
                "teacher_vram_gib": {k: round(v, 2) for k, v in b.teacher_vram_gib.items()},
                "kd_vram_gib": {f"{r.method} {r.student}": round(r.vram_gib, 2) for r in b.runs
                                if r.method in ("kd", "cascod-kd") and r.seed == cfg.seeds[0]},
                "local_peak_gb": round(b.local_peak_gb, 2), "fits": b.fits,
                "problems": list(b.problems),
                "bf16 device_map='auto'": None if q4 else
                "offloads what does not fit the card to CPU RAM (slow); the plan counts it on "
                "the GPU"})
    return budget


# -- `slmkd plan` ---------------------------------------------------------------------------------
def detect_resources(drive_root: str | None = None) -> dict[str, float | None]:
    """The GPU (``nvidia-smi``, minus what the driver reserves), free local disk (``/content`` on
    Colab, else the working directory) and free space on the Drive root; None where unknown."""
    import os
    import shutil
    import subprocess

    out: dict[str, float | None] = {"gpu_gib": None, "disk_free_gb": None, "drive_free_gb": None}
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                               "nounits"], capture_output=True, text=True, timeout=20,
                              check=True).stdout.split()
        if text:  # MiB as the driver reports it; torch sees ~0.8 GiB less
            out["gpu_gib"] = round(float(text[0]) / 1024 - 0.8, 1)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    local = "/content" if os.path.isdir("/content") else os.getcwd()
    out["disk_free_gb"] = shutil.disk_usage(local).free / GB
    if drive_root and os.path.isdir(drive_root):
        out["drive_free_gb"] = shutil.disk_usage(drive_root).free / GB
    return out


__all__ = ["CONSTANTS", "Constant", "ESCALATION_TEACHER", "EXIT_DISK", "EXIT_DRIVE", "EXIT_GPU",
           "RunBudget", "StudyBudget", "device_for", "expected_decode_steps", "generation_cost",
           "generation_vram_gib", "plan_study_budget", "set_constant",
           "detect_resources"]
