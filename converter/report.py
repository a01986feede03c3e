"""The human report (``report.md``) and the machine summary (``--json``) of one conversion."""

from __future__ import annotations

from typing import Any

__all__ = ["render_markdown", "summary"]


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _kb(v: Any) -> str:
    return "-" if v is None else f"{v / 1024:.1f} KB"


def _interval(iv: dict[str, Any] | None) -> str:
    if not iv:
        return "-"
    return f"{iv['pct']:.2f}% [{iv['low']:.2f}, {iv['high']:.2f}]"


def _worst(m: dict[str, Any]) -> str:
    w = m.get("worst_class")
    return "-" if not w else f"class {w['class']}: {w['pct']:.1f}% ({w['successes']}/{w['trials']})"


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a script wants: where the artifact is, whether it may ship, and why not."""
    chosen = report.get("chosen") or {}
    metrics = chosen.get("metrics") or {}
    return {"out": report["out"], "deployable": report["deployable"], "reasons": report["reasons"],
            "name": report["name"], "version": report["version"], "profile": report["profile"],
            "recipe": chosen.get("name"), "size": chosen.get("size"), "gzip_size": chosen.get("gzip_size"),
            "float_size": report["float"]["size"], "top1_agreement_pct": metrics.get("top1_agreement_pct"),
            "accuracy_pct": metrics.get("accuracy_pct"), "float_accuracy_pct": metrics.get("float_accuracy_pct"),
            "min_cosine": min((metrics.get("cosine") or {"-": None}).values(), default=None),
            "top1_agreement_interval": metrics.get("top1_agreement_interval"), "kernel": chosen.get("kernel"),
            "slowdown": chosen.get("slowdown"), "host_latency_ms": chosen.get("host_latency_ms"),
            "signed": report["signed"]}


def _breakdown_rows(fl: dict[str, Any] | None, ch: dict[str, Any] | None) -> list[str]:
    """Where the bytes are: per-channel quantization parameters and the graph do not shrink with the weights."""
    if not fl or not ch:
        return []
    rows = [("weights", "weights"), ("int32 biases", "bias"), ("quantization scales", "quant_scales"),
            ("quantization zero points (int64)", "quant_zero_points"), ("graph (ops, shapes, names)", "graph")]
    return [f"| - {label} | {_kb(fl[key])} | {_kb(ch[key])} |" for label, key in rows]


def render_markdown(report: dict[str, Any]) -> str:
    """A table a person can read in ten seconds, then the details."""
    fl, ch = report["float"], report.get("chosen") or {}
    m = ch.get("metrics") or {}
    verdict = "**deployable**" if report["deployable"] else "**NOT deployable**: " + "; ".join(report["reasons"])
    t = report["target"]
    threads = report.get("host_threads", 1)
    fid = report.get("fidelity") or {}
    rob = fid.get("robustness") or {}
    lines = [
        f"# {report['name']} {report['version']} for profile `{report['profile']}`",
        "",
        (f"Source: `{report['source']['path']}` ({report['source']['format']}), converted {report['created']} "
         f"by {report['converter_version']}. Verdict: {verdict}."),
        "",
        "| | float32 | chosen: " + str(ch.get("name")) + " |",
        "|---|---|---|",
        f"| size | {_kb(fl['size'])} | {_kb(ch.get('size'))} |",
        f"| gzip size | {_kb(fl['gzip_size'])} | {_kb(ch.get('gzip_size'))} |",
        *_breakdown_rows(fl.get("size_breakdown"), ch.get("size_breakdown")),
        f"| top-1 accuracy | {_pct(m.get('float_accuracy_pct'))} | {_pct(m.get('accuracy_pct'))} |",
        f"| top-1 agreement with float [95% interval] | 100% | {_interval(m.get('top1_agreement_interval'))} |",
        f"| worst class agreement | 100% | {_worst(m)} |",
        f"| expected calibration error (labels) | {_num(m.get('float_ece_pct'), '.2f')} | {_num(m.get('ece_pct'), '.2f')} |",
        *[f"| agreement under {kind} (float vs chosen, both perturbed) | 100% | {_interval(iv)} |"
          for kind, iv in rob.items()],
        "| min output cosine | 1 | " + _num(min((m.get("cosine") or {"-": None}).values(), default=None)) + " |",
        f"| kernels on the device | float | {ch.get('kernel') or '-'} |",
        (f"| host latency (this machine, {threads} thread(s), XNNPACK, not the device) | "
         f"{_num(fl.get('host_latency_ms'), '.3f')} ms | {_num(ch.get('host_latency_ms'), '.3f')} ms |"),
        "",
        (f"Fidelity target ({report['profile']}): top-1 agreement's 95% lower bound >= {t['min_top1_agreement_pct']}%, "
         f"top-1 drop <= {t['max_top1_drop_pct']} points, cosine >= {t['min_cosine']}"
         + (f", no class's agreement below 100% by more than {t['max_class_drop_pct']} points"
            if t.get("max_class_drop_pct") is not None else "")
         + (f", host latency <= {t['max_slowdown']}x the fastest full-int8 candidate"
            if t.get("max_slowdown") is not None else "")
         + f". Measured on {m.get('samples', '-')} held-out samples ({report['eval_source']}), never calibrated on."),
        "",
    ]
    if fid.get("fastest_faithful"):
        lines += [(f"Speed and fidelity could not be had together: the fastest faithful candidate is "
                   f"`{fid['fastest_faithful']}`, the most faithful one within the speed limit "
                   f"`{fid.get('most_faithful_fast')}` (written here, not deployable)."), ""]
    lines += [
        "## Recipes tried",
        "",
        ("| recipe | size | gzip | agreement [95% interval] | worst class | accuracy | cosine | SNR dB | kernels | "
         "host ms | x fastest int8 | result |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["recipes"]:
        rm = r.get("metrics") or {}
        cos = min((rm.get("cosine") or {"-": None}).values(), default=None)
        snr = min((rm.get("snr_db") or {"-": None}).values(), default=None)
        result = r.get("error") or ("meets target" if r.get("meets_target") else
                                    "; ".join(r["misses"] + ([r["too_slow"]] if r.get("too_slow") else [])))
        lines.append(f"| {r['name']} | {_kb(r.get('size'))} | {_kb(r.get('gzip_size'))} | "
                     f"{_interval(rm.get('top1_agreement_interval'))} | {_worst(rm)} | "
                     f"{_pct(rm.get('accuracy_pct'))} | {_num(cos)} | {_num(snr, '.1f')} | {r.get('kernel') or '-'} | "
                     f"{_num(r.get('host_latency_ms'), '.3f')} | {_num(r.get('slowdown'), '.2f')} | {result} |")
    eq = report.get("equalization")
    if eq:
        lines += ["", (f"Cross-layer equalization (per-tensor recipes): {eq['pairs']} layer pairs, {eq['channels']} "
                       f"channels rescaled so one weight scale per tensor fits them all ({eq['pinned']} left alone "
                       f"because they reach a ReLU cap); then the expected rounding error of per-tensor weights "
                       f"removed from the output offsets of {eq.get('bias_corrected', 0)} layers.")]
    fit = report.get("weight_fitting") or {}
    for method, lr in (fit.get("learned_rounding") or {}).items():
        lines += ["", (f"Learned rounding (AdaRound; {method} activation ranges): {lr['kernels']} kernels, "
                       f"{lr['flipped']} of {lr['weights']} weights rounded away from nearest, layer output error "
                       f"{lr['error_ratio']:.2f}x nearest rounding's ({lr['kept_nearest']} kernels kept nearest).")]
    for method, d in (fit.get("distillation") or {}).items():
        lines += ["", (f"Distillation fine-tune ({method} activation ranges, {d['tensors']} tensors fake-quantized): "
                       f"{d['epochs']} epochs, {d['steps']} steps on the calibration samples; distillation loss "
                       f"{d['loss_before']:.5f} -> {d['loss_after']:.5f} (best epoch kept).")]
    lines += ["", f"Tensor names: {report.get('tensor_names', 'kept')}."]
    pr = report.get("pruning")
    if pr:
        lines += ["", "## Pruning", "",
                  (f"Parameters {pr['params_before']} -> {pr['params_after']}; kernel sparsity "
                   f"{_num(pr.get('sparsity'), '.2f')}; fine-tuned {pr['finetune_epochs']} epochs by distillation."),
                  ""]
        for layer, kept in pr["pruned_layers"].items():
            lines.append(f"- `{layer}`: kept {kept} filters")
        for item in pr["skipped"]:
            lines.append(f"- left untouched: {item}")
    lines += ["", "## Ops", ""]
    non_int = ch.get("non_integer_ops") or []
    lines.append("Non-integer ops in the chosen model: " + (", ".join(non_int) if non_int else "none") + ".")
    ops = ch.get("op_counts") or {}
    lines.append("Op counts: " + ", ".join(f"{k} x{v}" for k, v in ops.items()) + ".")
    tpu = report.get("edgetpu")
    if tpu:
        lines += ["", "## Edge TPU", "",
                  "Static check: " + ("all ops map to the Edge TPU" if tpu["static_ok"]
                                      else "ops that would run on the CPU: " + ", ".join(tpu["cpu_ops"])),
                  "", tpu["note"] + "."]
        for p in tpu["problems"]:
            lines.append(f"- {p}")
    g = report.get("golden") or {}
    lines += ["", "## Device health check", "",
              (f"{g.get('count', 0)} golden samples, atol {g.get('atol')} (measured int8-vs-float error "
               f"{_num(g.get('measured_error'))})."), ""]
    return "\n".join(lines)
