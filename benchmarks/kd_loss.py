"""Benchmark the KD losses: peak extra memory and time of forward + backward.

Default sizes are Qwen2.5-1.5B (student) and Qwen2.5-7B (teacher) lm heads: V = 151,936,
Hs = 1,536, Ht = 3,584. Every variant starts from the same inputs (final hidden states
``(B, T, H)`` and lm-head weights, student ones requiring grad) and computes the logits its own
way:

* ``naive``  - full logits, fp32 log-softmaxes, autograd (what a first implementation does);
* ``kd_loss`` - full logits (``h @ W.T``) then :func:`slmkd.losses.kd_loss`;
* ``fused``  - :func:`slmkd.losses.fused_kd_loss` from hidden states (default chunk size for
  the device, or ``--chunk-size``); ``fused@N`` runs it with ``chunk_size=N``;
* ``liger``  - ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0, temperature=T,
  compiled=False)`` (forward KL, same weights; skipped when ``liger-kernel`` is not importable).

Each (variant, tokens) runs in its own subprocess. "Peak extra memory" is measured after the
inputs exist: on CUDA ``torch.cuda.max_memory_allocated() - memory_allocated()`` at the start;
on CPU the growth of the process's peak resident set size (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` before the call; falls back to a 2 ms RSS sampler when
the reset is not allowed). It includes the gradients produced (``grad_W`` is 0.47 GB in bf16,
0.93 GB in fp32).

Usage::

    python benchmarks/kd_loss.py --dtype float32 --variants fused,liger   # CPU: 4,096 tokens
    python benchmarks/kd_loss.py --dtype float32 --tokens 1024 --variants fused@128,fused@512
    python benchmarks/kd_loss.py --device cuda --dtype bf16 --check  # fp64 check, then the
                                                   # bf16 table at 1k/4k/8k tokens, all variants
    python benchmarks/kd_loss.py --check-only      # only the correctness check on --device
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("naive", "kd_loss", "fused", "liger")


# ---------------------------------------------------------------------------------------------
# memory probes
# ---------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class _CpuPeak:
    """Peak RSS growth of this process while the block runs."""

    def __enter__(self):
        self.reset_ok = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            pass
        self.base = _status_kb("VmRSS")
        self.peak_sampled = self.base
        self._stop = threading.Event()
        if not self.reset_ok:
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak_sampled = max(self.peak_sampled, _status_kb("VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        peak = _status_kb("VmHWM") if self.reset_ok else self.peak_sampled
        self.extra_bytes = max(0, peak - self.base) * 1024
        return False


class _CudaPeak:
    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def __enter__(self):
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self.torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        self.torch.cuda.synchronize(self.device)
        self.extra_bytes = self.torch.cuda.max_memory_allocated(self.device) - self.base
        return False


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
def _naive(torch, h, ws, ht, wt, labels, T, alpha, M):
    import torch.nn.functional as F

    s = (h @ ws.t()).float()[:, :-1].clamp(-M, M)
    with torch.no_grad():
        t = (ht @ wt.t()).float()[:, :-1].clamp(-M, M)
    y = labels[:, 1:]
    mask = y != -100
    n = mask.sum()
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=-100,
                         reduction="sum") / n
    ls = torch.log_softmax(s / T, dim=-1)
    lt = torch.log_softmax(t / T, dim=-1)
    kd = ((lt.exp() * (lt - ls)).sum(-1) * mask).sum() * (T * T) / n
    return (1 - alpha) * ce + alpha * kd


def _kd_loss(torch, h, ws, ht, wt, labels, T, alpha, M):
    from slmkd.losses import kd_loss

    with torch.no_grad():
        t = ht @ wt.t()
    return kd_loss(h @ ws.t(), t, labels, temperature=T, alpha=alpha, max_logit_abs=M).loss


def _make_fused(chunk_size):
    def run(torch, h, ws, ht, wt, labels, T, alpha, M):
        from slmkd.losses import fused_kd_loss

        return fused_kd_loss(h, ws, ht, wt, labels, temperature=T, alpha=alpha,
                             max_logit_abs=M, chunk_size=chunk_size).loss

    return run


def _make_liger(T, alpha):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    mod = LigerFusedLinearJSDLoss(weight_hard_loss=1 - alpha, weight_soft_loss=alpha, beta=0.0,
                                  temperature=T, compiled=False)

    def run(torch, h, ws, ht, wt, labels, T_, alpha_, M):
        # Liger expects pre-shifted, flattened inputs (prepared outside the measurement).
        return mod(h, ws, ht, wt, labels)

    return run


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dt = getattr(torch, _DTYPES[args.dtype])
    n = args.n
    b = max(1, n // 1024)
    t_len = n // b
    ws = torch.empty(args.vocab, args.hs, dtype=dt, device=dev).normal_(0, 0.02)
    wt = torch.empty(args.vocab, args.ht, dtype=dt, device=dev).normal_(0, 0.02)
    h = torch.randn(b, t_len, args.hs, dtype=dt, device=dev)
    ht = torch.randn(b, t_len, args.ht, dtype=dt, device=dev)
    labels = torch.randint(0, args.vocab, (b, t_len), device=dev)
    labels[torch.rand(b, t_len, device=dev) < 0.1] = -100
    if args.variant == "liger":
        fn = _make_liger(args.temperature, args.alpha)
        h = h[:, :-1].reshape(-1, args.hs).contiguous()
        ht = ht[:, :-1].reshape(-1, args.ht).contiguous()
        labels = labels[:, 1:].reshape(-1).contiguous()
    elif args.variant.startswith("fused"):
        chunk = int(args.variant.split("@")[1]) if "@" in args.variant else args.chunk_size
        fn = _make_fused(chunk)
    else:
        fn = {"naive": _naive, "kd_loss": _kd_loss}[args.variant]
    h.requires_grad_()
    ws.requires_grad_()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step():
        h.grad = None
        ws.grad = None
        loss = fn(torch, h, ws, ht, wt, labels, args.temperature, args.alpha, 50.0)
        loss.backward()
        sync()
        return float(loss)

    for _ in range(args.warmup):
        step()
    times, cpu_times, loss = [], [], None
    probe = _CudaPeak(torch, dev) if dev.type == "cuda" else _CpuPeak()
    with probe:
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    return {"variant": args.variant, "tokens": n, "peak_extra_bytes": probe.extra_bytes,
            "time_s": statistics.median(times), "times": times,
            "cpu_s": statistics.median(cpu_times), "threads": torch.get_num_threads(),
            "loss": loss,
            "device": str(dev), "torch": torch.__version__,
            "mem_probe": ("cuda.max_memory_allocated" if dev.type == "cuda" else
                          ("VmHWM" if probe.reset_ok else "RSS sampler"))}


# ---------------------------------------------------------------------------------------------
# correctness check on the device
# ---------------------------------------------------------------------------------------------
def check(device: str) -> int:
    """fused_kd_loss / kd_loss / fused_cascod_loss against fp64, fp32 and bf16, on ``device``;
    on CUDA also counts the host syncs of a 1-chunk and a many-chunk call (must be equal)."""
    import torch

    from slmkd.losses import fused_cascod_loss, fused_kd_loss, kd_loss

    torch.manual_seed(0)
    dev = torch.device(device)
    failures = 0
    for dt in (torch.float32, torch.bfloat16):
        b, t, hs, ht, vs, vt, v = 2, 33, 64, 96, 5003, 5121, 4999
        h = torch.randn(b, t, hs, device=dev).to(dt).requires_grad_()
        w = (torch.randn(vs, hs, device=dev) * 0.3).to(dt).requires_grad_()
        hT = torch.randn(b, t, ht, device=dev).to(dt)
        wT = (torch.randn(vt, ht, device=dev) * 0.3).to(dt)
        labels = torch.randint(0, v, (b, t), device=dev)
        labels[:, :5] = -100
        out = fused_kd_loss(h, w, hT, wT, labels, temperature=2.0, alpha=0.5, vocab_size=v,
                            chunk_size=16)
        out.loss.backward()
        h64 = h.detach().double().requires_grad_()
        w64 = w.detach().double().requires_grad_()
        s64 = h64 @ w64.T
        s_lp = (h.detach() @ w.detach().T).requires_grad_()
        t_lp = hT @ wT.T
        ref = _reference64(torch, s64, hT.double() @ wT.double().T, labels, v, 2.0, 0.5)
        ref.backward()
        tol = 1e-5 if dt == torch.float32 else 1e-2
        rl = abs(float(out.loss.detach()) - float(ref.detach())) / abs(float(ref.detach()))
        rh = float((h.grad.double() - h64.grad).norm() / h64.grad.norm())
        rw = float((w.grad.double() - w64.grad).norm() / w64.grad.norm())
        o2 = kd_loss(s_lp, t_lp, labels, temperature=2.0, alpha=0.5, vocab_size=v, chunk_size=16)
        o2.loss.backward()
        s_ref = s_lp.detach().double().requires_grad_()
        r2 = _reference64(torch, s_ref, t_lp.double(), labels, v, 2.0, 0.5)
        r2.backward()
        rs = float((s_lp.grad.double() - s_ref.grad).norm() / s_ref.grad.norm())
        # CasCoD in one call vs the fp64 two-term formula (rows 0..b-1 rationale, b.. answer)
        h2 = torch.randn(2 * b, t, hs, device=dev).to(dt).requires_grad_()
        lab2 = torch.randint(0, v, (2 * b, t), device=dev)
        lab2[:, :3] = -100
        w.grad = None
        oc = fused_cascod_loss(h2, w, lab2, b, alpha_cascod=0.3, teacher_hidden=hT,
                               teacher_lm_head_weight=wT, temperature=2.0, alpha=0.5,
                               vocab_size=v, chunk_size=16)
        oc.loss.backward()
        h2_64 = h2.detach().double().requires_grad_()
        w2_64 = w.detach().double().requires_grad_()
        s2 = h2_64 @ w2_64.T
        rc_ref = (0.7 * _reference64(torch, s2[:b], hT.double() @ wT.double().T, lab2[:b], v,
                                     2.0, 0.5)
                  + 0.3 * _reference64(torch, s2[b:], None, lab2[b:], v, 1.0, 0.0))
        rc_ref.backward()
        rc = max(abs(float(oc.loss.detach()) - float(rc_ref.detach())) / abs(float(rc_ref.detach())),
                 float((h2.grad.double() - h2_64.grad).norm() / h2_64.grad.norm()),
                 float((w.grad.double() - w2_64.grad).norm() / w2_64.grad.norm()))
        ok = max(rl, rh, rw, rs, rc) <= tol
        failures += not ok
        print(f"check {device} {dt}: loss rel {rl:.2e}, grad_h rel {rh:.2e}, grad_W rel {rw:.2e},"
              f" kd_loss grad rel {rs:.2e}, cascod rel {rc:.2e} -> {'ok' if ok else 'FAIL'} "
              f"(tol {tol})", flush=True)
    if dev.type == "cuda":
        failures += _check_syncs(torch, dev)
    return failures


def _check_syncs(torch, dev) -> int:
    """Host syncs of one fused_kd_loss call with 1 chunk and with 16 chunks (must be equal)."""
    import warnings

    from slmkd.losses import fused_kd_loss

    b, t, hs, ht, v = 2, 129, 64, 96, 5000
    h = torch.randn(b, t, hs, device=dev, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(v, hs, device=dev, dtype=torch.bfloat16).requires_grad_()
    hT = torch.randn(b, t, ht, device=dev, dtype=torch.bfloat16)
    wT = torch.randn(v, ht, device=dev, dtype=torch.bfloat16)
    labels = torch.randint(0, v, (b, t), device=dev)
    counts = {}
    for chunk in (4096, 16):
        fused_kd_loss(h, w, hT, wT, labels, chunk_size=chunk)  # warm-up (lazy init)
        torch.cuda.synchronize(dev)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fused_kd_loss(h, w, hT, wT, labels, chunk_size=chunk)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[chunk] = sum("synchroniz" in str(r.message) for r in rec)
    ok = counts[4096] == counts[16]
    print(f"check {dev} host syncs per call: 1 chunk {counts[4096]}, 16 chunks {counts[16]} -> "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return int(not ok)


def _reference64(torch, s, t, labels, v, T, alpha):
    import torch.nn.functional as F

    y = labels[:, 1:]
    m = y != -100
    zs = s[:, :-1][m][:, :v].double().clamp(-50, 50)
    n = int(m.sum())
    ce = F.cross_entropy(zs, y[m], reduction="sum")
    if t is None:
        return ce / n
    zt = t[:, :-1][m][:, :v].double().clamp(-50, 50)
    lp = torch.log_softmax(zt / T, -1)
    kd = T * T * (lp.exp() * (lp - torch.log_softmax(zs / T, -1))).sum()
    return ((1 - alpha) * ce + alpha * kd) / n


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
           "fp16": "float16", "float16": "float16"}


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default=None,
                   help="comma-separated token counts (default 4096 on CPU, 1024,4096,8192 on CUDA)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="naive,kd_loss,fused,liger; fused@N = fused_kd_loss with chunk_size=N")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None, help="default 1 on CUDA, 0 on CPU")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hs", type=int, default=1_536)
    p.add_argument("--ht", type=int, default=3_584)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--chunk-size", type=int, default=None,
                   help="chunk_size of the 'fused' variant (default: the loss's device default)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: torch's); with 1 thread the CPU time "
                        "of the process is a contention-robust measure on a shared machine")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every (tokens, variant) subprocess this many times, alternating the "
                        "variant order; the table shows the fastest round (peak memory: the largest)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--check", action="store_true",
                   help="run the correctness check against fp64 first (abort on failure)")
    p.add_argument("--check-only", action="store_true", help="only run the correctness check")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.device.startswith("cuda") else 0
    if args.tokens is None:
        args.tokens = "1024,4096,8192" if args.device.startswith("cuda") else "4096"
    if args.worker:
        args.variant = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    if args.check or args.check_only:
        failures = check(args.device)
        if failures or args.check_only:
            return 1 if failures else 0

    runs = []
    variants = args.variants.split(",")
    for rnd, n in [(r, int(x)) for r in range(args.rounds) for x in args.tokens.split(",")]:
        for var in (variants if rnd % 2 == 0 else variants[::-1]):
            if var == "liger" and not _liger_available():
                print(f"[skip] liger at {n} tokens: liger-kernel not importable", flush=True)
                continue
            cmd = [sys.executable, __file__, "--worker", var, "--n", str(n), "--device",
                   args.device, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                   "--vocab", str(args.vocab), "--hs", str(args.hs), "--ht", str(args.ht),
                   "--dtype", args.dtype, "--temperature", str(args.temperature),
                   "--alpha", str(args.alpha), "--threads", str(args.threads)]
            if args.chunk_size is not None:
                cmd += ["--chunk-size", str(args.chunk_size)]
            t0 = time.perf_counter()
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                   env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                       [str(ROOT), os.environ.get("PYTHONPATH", "")])})
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode != 0 or not line:
                    err = (r.stderr.strip().splitlines() or ["?"])[-1]
                    res = {"variant": var, "tokens": n, "error": f"rc={r.returncode}: {err}"}
                else:
                    res = json.loads(line[-1][7:])
            except subprocess.TimeoutExpired:
                res = {"variant": var, "tokens": n, "error": f"timeout {args.timeout}s"}
            res["wall_s"] = time.perf_counter() - t0
            res["round"] = rnd
            runs.append(res)
            print(f"[done] round {rnd} {var} {n}: " + (res.get("error") or
                  f"{_gb(res['peak_extra_bytes'])} GB, {res['time_s']:.2f} s wall, "
                  f"{res['cpu_s']:.2f} s cpu"), flush=True)
    results = _best_of_rounds(runs)
    print()
    print(_table(results, args))
    verdict = _targets(results)
    if verdict:
        print()
        print(verdict)
    if args.json:
        Path(args.json).write_text(json.dumps({"best": results, "runs": runs}, indent=2))
    return 0


def _best_of_rounds(runs: list[dict]) -> list[dict]:
    """One row per (tokens, variant): the fastest round's times, the largest peak memory."""
    out: dict[tuple, dict] = {}
    for r in runs:
        key = (r["tokens"], r["variant"])
        if "error" in r:
            out.setdefault(key, r)
            continue
        b = out.get(key)
        if b is None or "error" in b:
            out[key] = dict(r)
            continue
        b["peak_extra_bytes"] = max(b["peak_extra_bytes"], r["peak_extra_bytes"])
        b["time_s"] = min(b["time_s"], r["time_s"])
        b["cpu_s"] = min(b["cpu_s"], r["cpu_s"])
    return list(out.values())


def _table(results: list[dict], args) -> str:
    head = (f"V={args.vocab:,} Hs={args.hs:,} Ht={args.ht:,} {_DTYPES[args.dtype]} "
            f"T={args.temperature} alpha={args.alpha} device={args.device} repeats={args.repeats} "
            f"rounds={args.rounds} threads={args.threads or 'default'} (median of repeats, "
            f"fastest round)")
    lines = [head, "",
             "| tokens | variant | peak extra mem (GB) | time (s) | CPU time (s) | mem / naive "
             "| time / naive | mem / liger | time / liger | CPU time / liger | loss |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["tokens"], r["variant"]): r for r in results}
    for r in sorted(results, key=lambda x: (x["tokens"], VARIANTS.index(x["variant"].split("@")[0])
                                            if x["variant"].split("@")[0] in VARIANTS else 9,
                                            x["variant"])):
        if "error" in r:
            lines.append(f"| {r['tokens']:,} | {r['variant']} | {r['error']} | | | | | | | | |")
            continue
        cells = []
        for ref in ("naive", "liger"):
            b = by.get((r["tokens"], ref))
            if b and "error" not in b and b["peak_extra_bytes"] > 0:
                cells += [f"{r['peak_extra_bytes'] / b['peak_extra_bytes']:.1%}",
                          f"{r['time_s'] / b['time_s']:.2f}x"]
                if ref == "liger":
                    cells.append(f"{r['cpu_s'] / b['cpu_s']:.2f}x")
            else:
                cells += ["-", "-"] + (["-"] if ref == "liger" else [])
        lines.append(f"| {r['tokens']:,} | {r['variant']} | {_gb(r['peak_extra_bytes'])} | "
                     f"{r['time_s']:.2f} | {r['cpu_s']:.2f} | " + " | ".join(cells)
                     + f" | {r['loss']:.4f} |")
    return "\n".join(lines)


def _targets(results: list[dict]) -> str:
    """The issue's targets for ``fused`` against ``liger``: time ≤ 1.0×, peak extra memory ≤."""
    by = {(r["tokens"], r["variant"]): r for r in results if "error" not in r}
    out = []
    for (n, var), r in sorted(by.items()):
        lg = by.get((n, "liger"))
        if var != "fused" or lg is None:
            continue
        tr = r["time_s"] / lg["time_s"]
        cr = r["cpu_s"] / lg["cpu_s"]
        mr = r["peak_extra_bytes"] / max(1, lg["peak_extra_bytes"])
        out.append(f"targets at {n:,} tokens: time fused/liger {tr:.2f}x wall, {cr:.2f}x CPU "
                   f"({'met' if max(tr, cr) <= 1.0 else 'MISSED'}, target <= 1.0x); peak extra "
                   f"memory fused/liger {mr:.1%} ({'met' if mr <= 1.0 else 'MISSED'}, "
                   f"target <= 100%)")
    return "\n".join(out)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
