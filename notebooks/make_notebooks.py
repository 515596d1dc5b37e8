"""Writes the numbered notebooks 00–05 (no outputs). Edit here, then run
``python3 notebooks/make_notebooks.py``; tests/test_notebooks.py checks the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slmkd.links import REPO, colab_badge  # noqa: E402


def md(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text.strip("\n")}


def code(text: str, tags: list[str] | None = None) -> dict:
    meta = {"tags": tags} if tags else {}
    return {"cell_type": "code", "metadata": meta, "execution_count": None, "outputs": [],
            "source": text.strip("\n")}


def header(name: str, title: str, body: str) -> dict:
    return md(f"# {title}\n\n{colab_badge(name)}\n\n{body.strip()}")


INSTALL = f'''
# Colab only: install slmkd and its non-torch dependencies (Colab's own torch is kept).
import subprocess
import sys

REPO = "{REPO}"  # GitHub owner/name, the same constant as slmkd.links.REPO
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                    f"https://raw.githubusercontent.com/{{REPO}}/main/colab_requirements.txt"],
                   check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    f"git+https://github.com/{{REPO}}@main"], check=True)
    # vLLM (generation backend "auto" uses it when importable): only a release built for the
    # torch Colab already has -- pinning torch makes pip pick that release or give up, so torch
    # is never replaced. Without vLLM the HF backend is used (slower; `slmkd plan` says how much).
    import torch

    pin = "torch==" + torch.__version__.split("+")[0]
    try:
        ok = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "vllm", pin],
                            timeout=900).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    print("vLLM installed" if ok else f"no vLLM release for {{pin}}: generation uses HF")
'''

PARAM_HEAD = '''
import os

# Plain defaults; papermill/nbmake may override this cell. SLM_KD_* environment variables
# (SLM_KD_CLIP_GRAD_NORM, SLM_KD_MAX_LOGIT_ABS, SLM_KD_MIN_SUPERVISED_TOKENS, SLM_KD_DEBUG_NAN,
# SLM_KD_LOG_EVERY) are applied on top by slmkd.config.load_config.
PROFILE = os.environ.get("SLMKD_PROFILE", "a100-80g")  # a100-80g | a100-40g | tiny
FAST = os.environ.get("SLMKD_NB_FAST", "1" if PROFILE == "tiny" else "0") == "1"  # smoke sizes
'''

SETUP = '''
from slmkd.notebook import notebook_config, show_figures
from slmkd.preflight import preflight, print_preflight, require
from slmkd.runtime import get_drive_root

cfg = {cfg_expr}
drive_root = get_drive_root(cfg)  # mounts Google Drive on Colab
print(f"profile {{cfg.profile}}{{' (FAST smoke sizes)' if FAST else ''}}; "
      f"Drive root: {{drive_root}}")
from slmkd.study_plan import plan_study_budget

print(plan_study_budget(cfg).summary_line())
'''

NEXT = "**Next:** [{nb}]({nb}.ipynb) — {what}."


def nb_00() -> list[dict]:
    return [
        header("00_setup.ipynb", "00 · Setup and pre-flight", """
Mounts Google Drive, creates the Drive root every later notebook reads and writes
(`/content/drive/MyDrive/slmkd` on Colab), and checks the machine before hours of GPU time are
spent: GPU and free memory, Drive writable and its free space, package versions, the `SLM_KD_*`
overrides in force, and a **VRAM plan** for the chosen teacher, student and method. It reads
nothing and writes `preflight.json` to the Drive root; on the `tiny` profile it also builds the
cached offline world under `tiny/` (tokenizer, tiny teacher pretrained on a synthetic GSM8K-style
task, tiny students)."""),
        code(INSTALL),
        code(PARAM_HEAD + '''
METHOD = "kd"  # method the VRAM plan is for: sft | kd | cascod | cascod-2stage | cascod-kd
STUDENT = None  # a key of cfg.models (student_primary / student_small); None = first student
''', tags=["parameters"]),
        code(SETUP.format(cfg_expr="notebook_config(PROFILE, fast=FAST)")),
        md("""
## Pre-flight
The VRAM plan is computed from the model configs (no weights are downloaded): weights, gradients
and optimizer states of the student, its activations (with or without gradient checkpointing),
the chunked loss's working set, the teacher (bf16 or 4-bit), plus the CUDA context and allocator
fragmentation. It recommends a micro-batch × gradient-accumulation that keeps the effective batch
on 40 GB and 80 GB cards. If a setting does not fit, lower `train.batch_size` and raise
`train.grad_accum_steps` by the same factor, or turn on gradient checkpointing or the 4-bit
teacher."""),
        code('''
from slmkd.runtime import atomic_write_json

report = preflight(cfg, method=METHOD, student=STUDENT)
print_preflight(report)
atomic_write_json(drive_root / "preflight.json", report)
'''),
        code('''
from slmkd.planner import plan_for_config

# The same plan for every method and student of this profile (total GiB on the card).
for method in ("sft", "kd", "cascod"):
    for student in cfg.students:
        plan = plan_for_config(cfg, method=method, student=student)
        recs = "; ".join(r.line() for r in plan.recommendations)
        name = cfg.student_name(student)
        print(f"{method:7s} {name:28s} {plan.estimate.total_gib:6.1f} GiB | {recs}")
'''),
        md("""
## The study's budget before anything runs (`slmkd plan`)
Hours per stage, VRAM of every run against the card, local-disk and Drive peaks and the Drive
footprint once the study is done, from the model shapes and the measured/derived throughput
constants (each with its source). Anything that does not fit is named with its shortfall."""),
        code('''
from slmkd.study_plan import plan_study_budget

budget = plan_study_budget(cfg)
print(budget.format())
if not budget.fits:
    print("\\n!! something does not fit: see the lines above before starting 01")
'''),
        md("""
## The tiny offline world (tiny profile only)
Everything runs without the Hugging Face Hub on the `tiny` profile. The world is built once and
cached under `{drive_root}/tiny/`; later notebooks reuse it."""),
        code('''
if cfg.is_tiny:
    from slmkd.tiny import ensure_tiny_world

    world = ensure_tiny_world(cfg)
    print(f"tiny world: {world.root}; teacher held-out accuracy {world.teacher_accuracy:.1%}")
'''),
        md(NEXT.format(nb="01_teacher_cot", what="the teacher writes chains of thought")),
    ]


def nb_01() -> list[dict]:
    return [
        header("01_teacher_cot.ipynb", "01 · Teacher chain-of-thought", """
The teacher (Qwen2.5-7B-Instruct; the tiny teacher on the `tiny` profile) answers every training
question with a step-by-step rationale ending in `The answer is N.`. Reads the training split
(GSM8K from the Hub or a local file, or the tiny synthetic task); writes
`cot/{dataset}/{teacher}/shard-*.jsonl`, `cot_stats.json` and `cot_lengths.png` on the Drive
root. Generation is **resumable**: shards are written atomically, and a rerun generates only the
missing items."""),
        code(INSTALL),
        code(PARAM_HEAD + '''
DATASET = "gsm8k"  # gsm8k | bbh
LIMIT = None  # first N training items; None = the profile's value (all)
BATCH_SIZE = None  # generation batch; None = the profile's value
''', tags=["parameters"]),
        code(SETUP.format(cfg_expr='notebook_config(PROFILE, {"generation.dataset": DATASET, '
                                   '"generation.limit": LIMIT,\n'
                                   '                                      '
                                   '"generation.batch_size": BATCH_SIZE}, fast=FAST)') + '''
print_preflight(preflight(cfg, method="kd"))
'''),
        md("""
## What is kept, and why
Each completion gets flags: **incorrect** (its final answer differs from the gold answer),
**truncated** (it hit `max_new_tokens`), **repetitive** (an n-gram loops), **no answer**. Only
unflagged completions train the students: a student imitates whatever it is shown, so a wrong
or looping rationale teaches the wrong thing. `cot_stats.json` records the kept fraction, the
flag counts and the length distribution; a rising truncation rate means `max_new_tokens` is too
low."""),
        code('''
from slmkd.teacher import generate_cot, load_cot_records

result = generate_cot(cfg, dataset=DATASET)
print(f"{result.num_kept} of {result.num_records} kept -> {result.output_dir}")
'''),
        code('''
show_figures(result.histogram_path)
for rec in load_cot_records(result.output_dir)[:2]:
    print(rec["question"], "\\n---\\n", rec["completion"], "\\n===")
'''),
        code('''
if cfg.models.teacher_load_in_4bit:  # KD will distil the NF4 teacher: how far is it from bf16?
    from slmkd.teacher.drift import describe_drift, measure_cot_drift

    print(describe_drift(measure_cot_drift(cfg, DATASET)))
'''),
        md("""
## Optional: the teacher off the GPU (`kd.teacher_source = "cached"`)
One teacher forward over every kept CoT stores its top-k logits and log-normalisers per
supervised token (`teacher_cache/` beside the CoT; resumable, hash-checked). KD can then run
without the teacher on the card (method `kd-cached`, or `kd` with `kd.teacher_source="cached"`).
The loss is the KL of the (k+1)-bucket coarse-grainings: a lower bound of the full KL, exact as
k → V; `cache_stats.json` reports the top-k mass (coverage) at each temperature."""),
        code('''
CACHE_TEACHER = cfg.kd.teacher_source == "cached"  # set True to build the cache now
if CACHE_TEACHER:
    from slmkd.teacher.cache import cache_teacher

    cached = cache_teacher(cfg, dataset=DATASET)
    print(f"{cached.stats['records']} records, {cached.stats['bytes_per_token']:.0f} bytes/token, "
          f"coverage {cached.stats['coverage']} -> {cached.cache_dir}")
'''),
        md(NEXT.format(nb="02_kd_logits",
                       what="the students learn from these rationales (CoT-SFT and logit KD)")),
    ]


TRAIN_PARAMS = '''
STUDENTS = None  # keys of cfg.models, e.g. ["student_small"]; None = the profile's students
SEEDS = [42, 123, 456]  # three seeds: differences between methods are judged across seeds
TEMPERATURE_SCHEDULE = [2.0, 1.5, 1.0]  # one KD temperature per epoch
ALPHA_SCHEDULE = [0.5, 0.4, 0.3]  # weight of the KD term per epoch (1 - alpha on the CE)
LEARNING_RATE = None  # None = the profile's value
EPOCHS = None  # None = the profile's value (must equal the schedules' length)
BATCH_SIZE = None  # micro-batch; None = the profile's value
TEACHER_SOURCE = None  # kd / cascod-kd: "live" (teacher on the GPU) or "cached" (notebook 01's
                       # teacher cache, no teacher loaded); None = the profile's value
'''

TRAIN_OVERRIDES = '''overrides = {  # None = keep the profile's value
    "students": STUDENTS, "seeds": SEEDS,
    "kd.temperature_schedule": TEMPERATURE_SCHEDULE, "kd.alpha_schedule": ALPHA_SCHEDULE,
    "train.learning_rate": LEARNING_RATE, "train.epochs": EPOCHS, "train.batch_size": BATCH_SIZE,
    "kd.teacher_source": TEACHER_SOURCE,
}'''


def panel_cell(method: str) -> dict:
    return code(f'''
from slmkd.notebook import notebook_config
from slmkd.widgets import config_panel

{TRAIN_OVERRIDES}
cfg = notebook_config(PROFILE, overrides, fast=FAST)
# Sliders start at the values above. Move them, then run the cells below; headless runs keep them.
panel = config_panel(cfg, method="{method}")
''')


def train_setup(made_by_note: str) -> dict:
    return code(SETUP.format(cfg_expr="panel.apply(cfg)") + f'''
from slmkd.teacher import cot_dir

if not cfg.is_tiny:  # the tiny profile generates its CoT on demand
    require(cot_dir(cfg), made_by="01_teacher_cot", what="the teacher's chains of thought")
seeds = cfg.seeds[:1] if FAST else cfg.seeds  # FAST: 1 seed, a few steps ({made_by_note})
print_preflight(preflight(cfg, method=METHODS[-1]))
''')


def nb_02() -> list[dict]:
    return [
        header("02_kd_logits.ipynb", "02 · CoT-SFT and logit distillation", """
Trains each student on the teacher's rationales two ways: **CoT-SFT** (cross-entropy on the
teacher's text: the baseline) and **logit KD** (the same plus matching the teacher's full
next-token distribution). Reads the teacher CoT from `cot/…` (notebook 01) and, on `tiny`, the
cached world; writes `runs/{method}/{student}/seed{N}/` — `config.json`, `log.jsonl`, `plots/`,
checkpoints (synced to Drive while training) and `final/`, then `train_summary.json` last.
Interrupted? Rerun: training resumes from the newest complete checkpoint."""),
        code(INSTALL),
        code(PARAM_HEAD + '''
METHODS = ["sft", "kd"]  # CoT-SFT baseline, then logit KD
''' + TRAIN_PARAMS, tags=["parameters"]),
        panel_cell("kd"),
        train_setup("the numbers mean nothing"),
        md("""
## Why the defaults look like this
* **Loss** `(1 − α)·CE + α·T²·KL(p_teacher^T ‖ p_student^T)`. Softening both distributions by `T`
  shrinks the KL's gradients by `1/T²`; multiplying by **T²** keeps the KD term on the same scale
  as the CE whatever the temperature, so α means the same thing in every epoch.
* **Schedules, one value per epoch:** high `T` and α early (rich "dark knowledge" from the
  teacher's near-misses), lower later so the student sharpens on the exact rationale.
* **Logit clamp** (`kd.max_logit_abs`, `SLM_KD_MAX_LOGIT_ABS`): bf16 logits occasionally spike;
  `exp` of a huge logit turns the KL into `inf`/`NaN`, and one such step can ruin the weights.
  Clamping both models' logits to ±50 before the softmax changes nothing in normal steps.
* **Skip low-token batches** (`train.min_supervised_tokens`): a batch whose prompts were
  truncated can have almost no supervised tokens; its loss is the mean of a handful of tokens,
  i.e. a huge-variance gradient. Such steps, and steps with a non-finite loss or gradient norm,
  are skipped and counted; the summary flags a run where ≥ 1 % were skipped.
* **Three seeds:** with a few hundred test questions, two runs of the same method differ by
  several points. Only a difference that holds across seeds (paired tests in the report) counts.
* The vocabularies differ (teacher 152,064 rows, students 151,936, tokenizer 151,665): the KD is
  computed over the shared tokenizer ids only."""),
        code('''
from slmkd.notebook import train_grid

# every method x student x seed; live plot of loss, CE, KD, grad norm and VRAM, redrawn in place;
# an interrupted run resumes by itself; one summary line per run, then the last run's plots
results = train_grid(cfg, METHODS, seeds, live_plot=True)
'''),
        md(NEXT.format(nb="03_cascod", what="CasCoD, the cascaded alternative") + "; or "
           "[04_evaluate](04_evaluate.ipynb) to score these runs."),
    ]


def nb_03() -> list[dict]:
    return [
        header("03_cascod.ipynb", "03 · CasCoD: cascading decomposed CoT distillation", """
CasCoD (Dai et al., EMNLP 2024) splits each teacher completion into its rationale and its final
answer and trains two cascaded tasks on the same student: *question → rationale*, and
*question + rationale → answer*. The answer can no longer be learned as a shortcut from the
question alone, so the student has to rely on its own reasoning. Reads the teacher CoT (notebook
01); writes `runs/cascod/{student}/seed{N}/` exactly like notebook 02 (resumable)."""),
        code(INSTALL),
        code(PARAM_HEAD + '''
METHODS = ["cascod"]  # also: "cascod-2stage", "cascod-kd" (CasCoD + logit KD from the teacher)
ALPHA_CASCOD = 0.1  # weight of the answer task (the authors' value); 1 - it on the rationale
''' + TRAIN_PARAMS, tags=["parameters"]),
        code(f'''
from slmkd.notebook import notebook_config
from slmkd.widgets import config_panel

{TRAIN_OVERRIDES}
overrides["cascod.alpha_cascod"] = ALPHA_CASCOD
cfg = notebook_config(PROFILE, overrides, fast=FAST)
# Sliders start at the values above (the KD schedule only matters for cascod-kd).
panel = config_panel(cfg, method="cascod")
'''),
        train_setup("the numbers mean nothing"),
        md("""
## Why these defaults
* **α = 0.1 on the answer task:** the answer is a few tokens, the rationale hundreds; the
  authors found a small weight on the answer keeps the rationale task dominant.
* **The answer cue** (`cascod.answer_cue`, "The answer is") marks where rationale ends;
  completions without it cannot be split and are skipped (counted in the run's data stats).
* The guards of notebook 02 apply unchanged: logit clamp, skipped low-token and non-finite
  steps, three seeds.
* **`cascod-2stage` keeps stage 1:** stage 1 trains question → rationale; stage 2 is a separate
  LoRA adapter on the *frozen* stage-1 model, trained on question + rationale → answer with the
  teacher's rationales mixed with the stage-1 student's own greedy ones
  (`cascod.stage2_student_rationale_fraction`, targets: the gold answer), so the answer step learns
  to read the rationales it will actually see. Cascaded inference writes the rationale with the
  adapter off and the answer with it on; the run's model is `stage1/final` + `stage2/adapter`.
* Notebook 04 measures, per CasCoD run, the answer accuracy given the teacher's rationale vs the
  student's own (the error-propagation gap); the report shows it per method."""),
        code('''
from slmkd.notebook import train_grid

results = train_grid(cfg, METHODS, seeds, live_plot=True)  # same guards, checkpoints and live plots as 02
'''),
        md(NEXT.format(nb="04_evaluate",
                       what="score every run, the base students and the teacher")),
    ]


def nb_04() -> list[dict]:
    return [
        header("04_evaluate.ipynb", "04 · Evaluation", """
Scores every finished run (`runs/*/*/seed*/` with a `train_summary.json`), the untrained base
students and the teacher on GSM8K (a fixed subset) and BIG-Bench Hard, with greedy decoding and
the same answer extraction for all. Reads `runs/…` (notebooks 02 and 03); writes
`eval/{model}/{dataset}/predictions.jsonl` and `summary.json` (accuracy with a 95 % interval).
Resumable: predictions are appended as they are made, and a rerun scores only the missing items.
A leakage guard refuses to score a run on questions it was trained on."""),
        code(INSTALL),
        code(PARAM_HEAD + '''
DATASETS = None  # e.g. ["gsm8k"]; None = the profile's (gsm8k and bbh; tiny: gsm8k)
EVAL_BASE = True  # also score the untrained students
EVAL_TEACHER = True  # and the teacher (the ceiling)
''', tags=["parameters"]),
        code(SETUP.format(cfg_expr='notebook_config(PROFILE, {"evaluation.datasets": DATASETS}, '
                                   'fast=FAST)') + '''
runs_root = require(drive_root / "runs", made_by="02_kd_logits", what="trained runs")
run_dirs = sorted(p.parent for p in runs_root.glob("**/train_summary.json")
                  if not p.parent.name.startswith("stage"))
if not run_dirs:
    raise FileNotFoundError(f"No finished run under {runs_root}: run 02_kd_logits / 03_cascod.")
print(f"{len(run_dirs)} finished run(s):", *[str(p.relative_to(runs_root)) for p in run_dirs],
      sep="\\n  ")
'''),
        md("""
## How the scoring works, and why
* **Greedy decoding**, the same prompt format and `max_new_tokens` for every model: the only
  thing that differs between rows of the report is the weights.
* **Fixed subsets** (`evaluation.gsm8k_limit`, `bbh_limit`, drawn with `subset_seed`): every
  model answers the same questions, which is what the paired tests of notebook 05 need.
* **Three metrics per item:** `strict` and `flexible` are lm-evaluation-harness's own filters
  (gsm8k_cot_zeroshot strict-match / flexible-extract; BBH cot get-answer / flexible-extract),
  reproduced exactly: `strict` is the number comparable with published lm-eval results.
  `lenient` is slmkd's forgiving scorer (LaTeX answers, option text, …). A big gap between them
  means the model reasons but does not follow the answer format."""),
        code('''
from slmkd.evaluation import evaluate_on_datasets, evaluate_run, format_summary_line

# each model is loaded once for all datasets, and released before the next one
summaries = []
for run_dir in run_dirs:
    summaries += evaluate_run(cfg, run_dir).values()
if EVAL_BASE:
    for student in cfg.students:
        summaries += evaluate_on_datasets(cfg, cfg.student_name(student), kind="base").values()
if EVAL_TEACHER:
    summaries += evaluate_on_datasets(cfg, cfg.teacher, kind="teacher").values()
'''),
        code('''
for s in summaries:
    print(format_summary_line(s))
'''),
        code('''
from slmkd.pipeline import error_propagation_for_run

# CasCoD runs: answer accuracy given the teacher's rationale vs the student's own (reuses the
# predictions above; only the answers given the teacher's rationales are generated)
if EVAL_TEACHER:
    for run_dir in run_dirs:
        if "cascod" in run_dir.parts[-3]:
            for ds in cfg.evaluation.datasets:
                ep = error_propagation_for_run(cfg, run_dir, ds)
                print(f"{run_dir.parts[-3]} {run_dir.parts[-2]} {run_dir.name} {ds}: given the "
                      f"teacher's rationale {ep['acc_teacher_rationale']:.1%}, own "
                      f"{ep['acc_own_rationale']:.1%}, gap {ep['propagation_gap']:+.1%}")
'''),
        md(NEXT.format(nb="05_report", what="tables, paired statistics and figures")),
    ]


def nb_05() -> list[dict]:
    return [
        header("05_report.ipynb", "05 · Report", """
Collects every `eval/*/*/summary.json` and `runs/*/train_summary.json` and writes `report/`:
`report.md` (accuracy per method, student and dataset as mean ± sd over seeds, paired tests of
KD and CasCoD against CoT-SFT with their p-values, the training health of every run),
`results.csv` and the figures, all shown below. Reads `eval/…` (notebook 04)."""),
        code(INSTALL),
        code(PARAM_HEAD, tags=["parameters"]),
        code(SETUP.format(cfg_expr="notebook_config(PROFILE, fast=FAST)") + '''
require(drive_root / "eval", made_by="04_evaluate", what="evaluation results")
'''),
        md("""
## Reading the statistics
Training seeds and items are both sources of variance. Each accuracy and each difference A − B
(per item, seeds matched) gets a 95 % interval from a two-way seed × item variance estimate;
verdicts use Holm-corrected p-values over every comparison the report makes, and the procedure's
false-positive rate was measured on simulated null studies (`benchmarks/stats_calibration.py`:
≤ 6 %). The report also says the smallest difference these k seeds and n items can detect; a
per-seed McNemar table is supplementary (conditional on those checkpoints, no verdicts)."""),
        code('''
from IPython.display import Markdown, display

from slmkd.report import write_report

out = write_report(cfg)
report_path = out[0] if isinstance(out, tuple) else out
print(f"report: {report_path}")
display(Markdown(report_path.read_text()))
show_figures(report_path.parent)
'''),
        md("That's the study. Rerunning any notebook continues where it stopped."),
    ]


NOTEBOOKS = {"00_setup": nb_00, "01_teacher_cot": nb_01, "02_kd_logits": nb_02,
             "03_cascod": nb_03, "04_evaluate": nb_04, "05_report": nb_05}


def notebook(cells: list[dict]) -> dict:
    for c in cells:
        src = c["source"]
        c["source"] = src.splitlines(keepends=True)
    return {
        "cells": cells,
        "metadata": {
            "accelerator": "GPU",
            "colab": {"gpuType": "A100", "provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def main() -> None:
    for name, make in NOTEBOOKS.items():
        nb = notebook(make())
        for i, c in enumerate(nb["cells"]):
            c["id"] = f"{name[:2]}-{i:02d}"
        (HERE / f"{name}.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        print(f"wrote notebooks/{name}.ipynb")


if __name__ == "__main__":
    main()
